"""Held calls through the gateway with the official MCP SDK client, in both protocol eras: a
call that needs approval waits for people, goes through once approved, exactly once, and only
for the arguments that were approved; a result held for review reaches the agent only once a
reviewer releases it, without a second upstream call; a call held for both runs once, after its
approval, and its released result reaches that user and agent once; a retry sent while the
approved run is upstream is told so, never held for a new approval."""

from __future__ import annotations

import base64
import contextlib
import json
import shlex
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import anyio
import pytest
from mcp import types
from mcp.shared.exceptions import MCPError

from bastion.facts.model import Entity
from bastion.policy.parser import parse_fact
from tests.conftest import drop_redis_keys, require_service
from tests.gateway.streams import legacy_session, messages, modern_headers, modern_request
from tests.gateway.support import (
    LAB,
    LegacyOnly,
    MemoryEvents,
    Recorder,
    Running,
    fresh_module,
    start,
)
from tests.oauth.support import free_socket, serve
from tests.redis_outage import RedisRelay
from tests.relays import Relay
from tests.waits import PATIENCE, eventually

ERAS = ["legacy", "auto"]  # 2025-11-25, 2026-07-28

RULES = """
declare approval_grant(User, Agent, String, Tool);
requires_approval(_user: User, "call", Tool{"deskhttp/send_email"});
approver(User{"avery"}, User{"sam"}, "call", Tool{"deskhttp/send_email"});
approval_window(_user: User, "call", Tool{"deskhttp/send_email"}, 30);
# The user confirms their own agent's call (no approver rule names anyone else).
requires_approval(_user: User, "call", Tool{"deskhttp/search_customers"}) if
  context.arguments.query in ["confirm", "vetoed", "recent"];
# The policy sees the approval a call comes back with, and may still refuse it.
deny(_user: User, "call", Tool{"deskhttp/search_customers"}) if
  context.arguments.query = "vetoed" and context.approval.channels = ["api"];
# What the call is allowed with is the decision made with its approval (a sign-in of today).
requires_recent_auth(_user: User, "call", Tool{"deskhttp/send_email"}, 86400) if
  context.approval.channels = ["api"];
# Approved, this call asks for a sign-in of the last second (none is that recent).
requires_recent_auth(_user: User, "call", Tool{"deskhttp/search_customers"}, 0) if
  context.arguments.query = "recent" and context.approval.channels = ["api"];
requires_review(_user: User, "read", McpResource{"deskhttp/customers://plans"});
approver(User{"avery"}, _user: User, "read", McpResource{"deskhttp/customers://plans"});
# One call held for approval and its result for review (docs/approvals.md, "A call held for
# approval and review"): avery answers both for sam's searches of "lovelace" (in any case), a
# user confirms and releases their own searches of "hopper"; a search of "turing" is reviewed
# until the review is lifted (a fact).
declare review_lifted(Tool);
requires_approval(_user: User, "call", Tool{"deskhttp/search_customers"}) if
  lower(context.arguments.query, q) and q in ["lovelace", "hopper", "turing"];
requires_review(_user: User, "call", Tool{"deskhttp/search_customers"}) if
  lower(context.arguments.query, q) and q in ["lovelace", "hopper"];
requires_review(_user: User, "call", tool: Tool) if
  tool = Tool{"deskhttp/search_customers"} and lower(context.arguments.query, "turing") and
  not review_lifted(tool);
approver(User{"avery"}, User{"sam"}, "call", Tool{"deskhttp/search_customers"}) if
  lower(context.arguments.query, q) and q in ["lovelace", "turing"];
# A call that stays upstream until the test releases it, held for approval (and its result
# for review when its arguments say so), which avery answers: retries reach bastion while the
# approved run is upstream.
requires_approval(_user: User, "call", Tool{"labhttp/run_until_released"});
requires_review(_user: User, "call", Tool{"labhttp/run_until_released"}) if
  context.arguments.reviewed = true;
approver(User{"avery"}, User{"sam"}, "call", Tool{"labhttp/run_until_released"});
# Completing the greeting's name waits for the user's own confirmation.
requires_approval(_user: User, "get", Prompt{"labhttp/greeting"}) if context.argument = "name";
"""


def _start(tmp_path_factory, name: str, approvals: dict, replicas: int = 0):
    with start(
        tmp_path_factory.mktemp(name),
        approvals=approvals,
        policy_extra=RULES,
        replicas=replicas,
    ) as running:
        yield running


@pytest.fixture(scope="module")
def bastion(tmp_path_factory):
    """Held requests answer at once (approval_pending), so the client retries."""
    yield from _start(tmp_path_factory, "holds", {"wait_seconds": 0}, replicas=1)


@pytest.fixture(scope="module")
def waiting(tmp_path_factory):
    """Held requests wait for an answer, as deployed."""
    yield from _start(tmp_path_factory, "holds-waiting", {"wait_seconds": 4})


async def attempt(client, seen, key, tool, arguments):
    try:
        result = await client.call_tool(tool, arguments)
        seen.setdefault(key, []).append(("ok", result.content[0].text))
    except MCPError as e:
        seen.setdefault(key, []).append(("error", e.error.code, e.error.data))


def approvals(bastion):
    return bastion.app.state.approvals


EMAIL = {"to": "ada@example.com", "subject": "hello", "body": "hi"}


def last_error(seen, key="calls") -> dict:
    kind, code, data = seen[key][-1]
    assert kind == "error"
    return {**data, "code": code}


@pytest.mark.parametrize("mode", ERAS)
def test_a_held_call_goes_through_once_approved_and_only_once(bastion, mode):
    email = {**EMAIL, "subject": f"once {mode}"}
    before = bastion.recorder.count("tools/call", name="send_email")

    async def script(client, seen):
        await attempt(client, seen, "calls", "send_email", email)
        data = last_error(seen)
        seen["held"] = data
        seen["ran_before_approval"] = (
            bastion.recorder.count("tools/call", name="send_email") - before
        )
        approvals(bastion).answer(data["approval_id"], "avery", "approve", channel="api")
        await attempt(client, seen, "calls", "send_email", email)  # goes through
        await attempt(client, seen, "calls", "send_email", email)  # a replay: held anew

    seen = bastion.sdk("sam", "deskhttp", mode, script)
    data = seen["held"]
    assert (data["code"], data["reason"]) == (-32008, "approval_pending")
    assert data["url"].endswith(f"/approvals/{data['approval_id']}")
    assert data["retry_after"] > 0
    assert seen["ran_before_approval"] == 0
    (_, _, _), (ok, text), (_, code, replay) = seen["calls"]
    assert ok == "ok" and "ada@example.com" in text
    assert (code, replay["reason"]) == (-32008, "approval_pending")
    assert replay["approval_id"] != data["approval_id"]
    assert bastion.recorder.count("tools/call", name="send_email") == before + 1
    used = approvals(bastion).get(data["approval_id"])
    assert used.status == "used"
    assert used.subject == "sam" and used.approvers == ("avery",)
    assert used.arguments == email  # in full, for the person who answers
    assert any("requires_approval" in rule for rule in used.rules)
    bastion.flush()
    record = bastion.records.get(used.used_by)
    assert record.result == "allow"
    assert record.obligations["approval"] == {"id": used.id, "kind": "approval"}
    assert record.obligations["max_auth_age"] == 86400
    held = bastion.records.get(data["decision_id"])
    assert held.result == "held" and held.obligations["approval"]["id"] == used.id
    assert "max_auth_age" not in held.obligations


@pytest.mark.parametrize("mode", ERAS)
def test_an_approval_is_spent_by_its_call_even_when_the_upstream_fails(bastion, mode):
    """bastion cannot tell whether an upstream that failed acted (the mail may have gone): the
    approval is not given back, and the same call is held again for a new one."""
    email = {**EMAIL, "subject": f"failed {mode}"}
    before = bastion.recorder.count("tools/call", name="send_email")

    async def script(client, seen):
        await attempt(client, seen, "calls", "send_email", email)
        seen["held"] = last_error(seen)
        approvals(bastion).answer(seen["held"]["approval_id"], "avery", "approve", channel="api")
        bastion.recorder.fail_next("send_email")
        await attempt(client, seen, "calls", "send_email", email)  # approved; the upstream fails
        await attempt(client, seen, "calls", "send_email", email)  # held anew

    seen = bastion.sdk("sam", "deskhttp", mode, script)
    held = seen["held"]
    (_, _, _), failed, (_, code, again) = seen["calls"]
    # The upstream failed; the error names the decision that let the call through.
    assert failed[:2] == ("error", -32000) and list(failed[2]) == ["decision_id"], failed
    assert (code, again["reason"]) == (-32008, "approval_pending")
    assert again["approval_id"] != held["approval_id"]
    assert approvals(bastion).get(held["approval_id"]).status == "used"
    assert bastion.recorder.count("tools/call", name="send_email") == before


@pytest.mark.parametrize("mode", ERAS)
def test_an_approval_does_not_cover_other_arguments(bastion, mode):
    email = {**EMAIL, "subject": f"bound {mode}"}

    async def script(client, seen):
        await attempt(client, seen, "calls", "send_email", email)
        seen["held"] = last_error(seen)
        approvals(bastion).answer(seen["held"]["approval_id"], "avery", "approve", channel="api")
        seen["before"] = bastion.recorder.count("tools/call", name="send_email")
        await attempt(client, seen, "calls", "send_email", {**email, "to": "eve@example.com"})

    seen = bastion.sdk("sam", "deskhttp", mode, script)
    other = last_error(seen)
    assert other["reason"] == "approval_pending"
    assert other["approval_id"] != seen["held"]["approval_id"]
    assert bastion.recorder.count("tools/call", name="send_email") == seen["before"]
    assert approvals(bastion).get(seen["held"]["approval_id"]).status == "approved"  # unused


@pytest.mark.parametrize("mode", ERAS)
def test_a_denied_call_is_refused_with_the_reason(bastion, mode):
    email = {**EMAIL, "subject": f"denied {mode}"}

    async def script(client, seen):
        await attempt(client, seen, "calls", "send_email", email)
        seen["held"] = last_error(seen)
        approvals(bastion).answer(
            seen["held"]["approval_id"], "avery", "deny", channel="api", reason="no"
        )
        await attempt(client, seen, "calls", "send_email", email)

    seen = bastion.sdk("sam", "deskhttp", mode, script)
    refused = last_error(seen)
    assert (refused["code"], refused["reason"]) == (-32003, "approval_denied")
    assert refused["approval_id"] == seen["held"]["approval_id"]


def test_an_expired_request_is_refused_then_asked_anew(bastion):
    email = {**EMAIL, "subject": "expired"}
    from bastion.approvals.service import NotAllowed

    async def script(client, seen):
        await attempt(client, seen, "calls", "send_email", email)
        held = seen["held"] = last_error(seen)
        approvals(bastion).store.db.execute(
            "UPDATE approval_requests SET expires_at = ? WHERE id = ?",
            (time.time() - 1, held["approval_id"]),
        )
        with pytest.raises(NotAllowed, match="expired"):
            approvals(bastion).answer(held["approval_id"], "avery", "approve", channel="api")
        await attempt(client, seen, "calls", "send_email", email)
        seen["expired"] = last_error(seen)
        await attempt(client, seen, "calls", "send_email", email)

    seen = bastion.sdk("sam", "deskhttp", "legacy", script)
    assert seen["expired"]["reason"] == "approval_expired"
    anew = last_error(seen)
    assert anew["reason"] == "approval_pending"
    assert anew["approval_id"] != seen["held"]["approval_id"]


def test_two_identical_pending_calls_share_one_request_and_one_of_them_goes_through(bastion):
    email = {**EMAIL, "subject": "twice"}
    before = bastion.recorder.count("tools/call", name="send_email")

    async def script(client, seen):
        await attempt(client, seen, "first", "send_email", email)
        await attempt(client, seen, "first", "send_email", email)
        approvals(bastion).answer(
            last_error(seen, "first")["approval_id"], "avery", "approve", channel="api"
        )
        await attempt(client, seen, "then", "send_email", email)
        await attempt(client, seen, "then", "send_email", email)

    seen = bastion.sdk("sam", "deskhttp", "legacy", script)
    (_, _, a), (_, _, b) = seen["first"]
    assert a["approval_id"] == b["approval_id"]
    assert [s[0] for s in seen["then"]] == ["ok", "error"]
    assert bastion.recorder.count("tools/call", name="send_email") == before + 1


def test_the_agent_and_other_users_cannot_approve(bastion):
    from bastion.approvals.service import NotAllowed

    token = bastion.token("sam", "deskhttp")
    held = raw_call(bastion, token, {**EMAIL, "subject": "who approves"})["error"]["data"]
    request = approvals(bastion).get(held["approval_id"])
    for who in ("sam", request.client_id, "mallory"):
        with pytest.raises(NotAllowed):
            approvals(bastion).answer(request.id, who, "approve", channel="api")
    assert approvals(bastion).get(request.id).status == "pending"


def raw_call(bastion, token, arguments, url=None, tool="send_email"):
    """tools/call in 2026-07-28 with a plain HTTP client (one token: one user and one agent)."""
    response = bastion.http.post(
        url or bastion.mcp_url("deskhttp"),
        json=modern_request(1, "tools/call", {"name": tool, "arguments": arguments}),
        headers=modern_headers(token, "tools/call", tool),
    )
    assert response.status_code == 200, response.text
    return messages(response)[-1]  # plain JSON, or events when the answer began early (load)


def test_an_approved_completion_does_not_cover_the_same_argument_in_another_context(bastion):
    """A completion's ``context.arguments`` (the prompt's other arguments) go upstream with it,
    and the policy sees them: they are bound to its approval with the argument completed. An
    approval given for one context was spent by the same argument in another."""
    token = bastion.token("sam", "labhttp")

    def complete(arguments: dict) -> dict:
        params = {
            "ref": {"type": "ref/prompt", "name": "greeting"},
            "argument": {"name": "name", "value": "A"},
            "context": {"arguments": arguments},
        }
        response = bastion.http.post(
            bastion.mcp_url("labhttp"),
            json=modern_request(1, "completion/complete", params),
            headers=modern_headers(token, "completion/complete"),
        )
        assert response.status_code == 200, response.text
        return messages(response)[-1]

    held = complete({"team": "support"})["error"]["data"]
    assert held["reason"] == "approval_pending"
    approvals(bastion).answer(held["approval_id"], "sam", "approve", channel="api")
    other = complete({"team": "finance"})["error"]["data"]
    assert other["reason"] == "approval_pending" and other["approval_id"] != held["approval_id"]
    assert approvals(bastion).get(other["approval_id"]).arguments == {
        "argument": {"name": "name", "value": "A"},
        "context": {"arguments": {"team": "finance"}},
    }
    approved = complete({"team": "support"})
    assert approved["result"]["completion"]["values"] == ["Ada", "Alan"]


def caught_up(bastion) -> None:
    head = bastion.store.head()
    assert eventually(lambda: bastion.app.state.replica.applied >= head, every=0.01), (
        "the replica did not catch up"
    )


def test_an_approval_for_minutes_lets_the_tool_run_with_any_arguments_until_revoked(bastion):
    token = bastion.token("sam", "deskhttp")
    held = raw_call(bastion, token, {**EMAIL, "subject": "window"})["error"]["data"]
    approvals(bastion).answer(held["approval_id"], "avery", "approve", minutes=10, channel="api")
    [grant] = list(bastion.store.get(("approval_grant", None, None, None, None)))
    assert grant.expires_at == pytest.approx(time.time() + 600, abs=30)
    caught_up(bastion)
    before = bastion.recorder.count("tools/call", name="send_email")
    for subject in ("first", "second"):
        answer = raw_call(bastion, token, {**EMAIL, "subject": subject})
        assert "result" in answer, answer
    assert bastion.recorder.count("tools/call", name="send_email") == before + 2
    # Another agent of the same user is not covered.
    other = raw_call(bastion, bastion.token("sam", "deskhttp"), {**EMAIL, "subject": "other"})
    assert other["error"]["data"]["reason"] == "approval_pending"
    # Revoked like any fact.
    bastion.apply(deletes=[grant.fact])
    again = raw_call(bastion, token, {**EMAIL, "subject": "after"})
    assert again["error"]["data"]["reason"] == "approval_pending"


def test_a_user_confirms_their_own_agents_call(bastion):
    from bastion.approvals.service import NotAllowed

    token = bastion.token("sam", "deskhttp")
    confirm = {"query": "confirm"}
    held = raw_call(bastion, token, confirm, tool="search_customers")["error"]["data"]
    assert approvals(bastion).get(held["approval_id"]).approvers == ()
    with pytest.raises(NotAllowed):
        approvals(bastion).answer(held["approval_id"], "avery", "approve", channel="api")
    approvals(bastion).answer(held["approval_id"], "sam", "approve", channel="api")
    assert "result" in raw_call(bastion, token, confirm, tool="search_customers")


def test_the_decision_made_with_an_approval_can_still_ask_for_a_recent_sign_in(bastion):
    """The sign-in age the policy asks of an approved call is enforced, not only recorded: the
    call is challenged (RFC 9470), nothing reaches the upstream, and the approval is not used."""
    token = bastion.token("sam", "deskhttp")
    recent = {"query": "recent"}
    held = raw_call(bastion, token, recent, tool="search_customers")["error"]["data"]
    approvals(bastion).answer(held["approval_id"], "sam", "approve", channel="api")
    before = bastion.recorder.count("tools/call", name="search_customers")
    response = bastion.http.post(
        bastion.mcp_url("deskhttp"),
        json=modern_request(1, "tools/call", {"name": "search_customers", "arguments": recent}),
        headers=modern_headers(token, "tools/call", "search_customers"),
    )
    assert response.status_code == 401, response.text
    challenge = response.headers["www-authenticate"]
    assert "insufficient_user_authentication" in challenge and 'max_age="0"' in challenge
    assert bastion.recorder.count("tools/call", name="search_customers") == before
    assert approvals(bastion).get(held["approval_id"]).status == "approved"


def test_a_request_held_by_one_replica_is_answered_and_used_through_another(bastion):
    """Requests live in the database, not in a process: what one bastion (a replica, or the
    same one before a restart) held, another finds."""
    token = bastion.token("sam", "deskhttp")
    email = {**EMAIL, "subject": "replica"}
    other = f"{bastion.replicas[0]}/mcp/deskhttp"
    held = raw_call(bastion, token, email, url=other)["error"]["data"]
    assert held["reason"] == "approval_pending"
    assert held["url"].startswith(bastion.url)  # the issuer's page, whichever replica held it
    approvals(bastion).answer(held["approval_id"], "avery", "approve", channel="api")
    assert "result" in raw_call(bastion, token, email)


def test_a_call_is_refused_when_the_approval_store_cannot_be_read(bastion):
    token = bastion.token("sam", "deskhttp")
    db = approvals(bastion).store.db
    db.execute("ALTER TABLE approval_requests RENAME TO approval_requests_away")
    try:
        refused = raw_call(bastion, token, {**EMAIL, "subject": "no store"})
    finally:
        db.execute("ALTER TABLE approval_requests_away RENAME TO approval_requests")
    assert refused["error"]["data"]["reason"] == "approval_unavailable"
    assert "result" not in refused


def test_a_retry_cannot_present_another_callers_request_state(bastion):
    token = bastion.token("sam", "deskhttp")
    states = bastion.app.state.gateway.states
    forged = states.sign("some-request", "avery", ("another-agent",))
    response = bastion.http.post(
        bastion.mcp_url("deskhttp"),
        json=modern_request(
            1,
            "tools/call",
            {"name": "send_email", "arguments": EMAIL, "requestState": forged},
        ),
        headers=modern_headers(token, "tools/call", "send_email"),
    ).json()
    assert response["error"]["data"]["reason"] == "approval_mismatch"


# -- URL elicitation: the client is asked to open the page, and waits --------------------------


@pytest.mark.parametrize("mode", ERAS)
def test_a_client_with_url_elicitation_is_sent_to_the_page_and_its_call_goes_through(waiting, mode):
    """2026-07-28: an input_required result asking to open the page, then the client's retry
    with bastion's requestState; 2025-11-25: elicitation/create during the held call, which
    waits and goes on once approved. Here the user confirms their own agent's call, as the page
    would let them."""
    asked: list = []

    async def elicit(context, params):
        asked.append(params)
        request_id = str(params.url).rsplit("/", 1)[1]
        approvals(waiting).answer(request_id, "sam", "approve", channel="elicitation")
        return types.ElicitResult(action="accept")

    async def script(client, seen):
        await attempt(client, seen, "calls", "search_customers", {"query": "confirm"})

    seen = waiting.sdk("sam", "deskhttp", mode, script, elicitation_callback=elicit)
    [(kind, text)] = seen["calls"]
    assert kind == "ok" and "customers" in text
    [params] = asked
    assert params.mode == "url" and "/approvals/" in str(params.url)
    # The person reads the target as every refusal and the docs name it.
    assert params.message == (
        "bastion holds tools/call deskhttp/search_customers until it is approved: open the page"
        " to answer"
    )
    request = approvals(waiting).get(str(params.url).rsplit("/", 1)[1])
    assert request.status == "used"


@pytest.mark.parametrize("mode", ERAS)
def test_a_declined_elicitation_leaves_the_call_pending(waiting, mode):
    async def decline(context, params):
        return types.ElicitResult(action="decline")

    async def script(client, seen):
        started = time.monotonic()
        await attempt(client, seen, "calls", "search_customers", {"query": "confirm"})
        seen["waited"] = time.monotonic() - started

    seen = waiting.sdk("sam", "deskhttp", mode, script, elicitation_callback=decline)
    error = last_error(seen)
    assert error["reason"] == "approval_pending"
    assert approvals(waiting).get(error["approval_id"]).status == "pending"


# -- review of results before release ----------------------------------------------------------


def read(bastion, token, uri="customers://plans"):
    response = bastion.http.post(
        bastion.mcp_url("deskhttp"),
        json=modern_request(1, "resources/read", {"uri": uri}),
        headers=modern_headers(token, "resources/read", uri),
    )
    assert response.status_code == 200, response.text
    # Plain JSON, or an event stream when the answer took a while (under load).
    return messages(response)[-1]


def test_a_result_held_for_review_is_released_once_without_a_second_upstream_call(bastion):
    token = bastion.token("sam", "deskhttp")
    before = bastion.recorder.count("resources/read", uri="customers://plans")
    held = read(bastion, token)["error"]["data"]
    assert held["reason"] == "review_pending"
    assert bastion.recorder.count("resources/read", uri="customers://plans") == before + 1
    assert read(bastion, token)["error"]["data"]["approval_id"] == held["approval_id"]
    request = approvals(bastion).get(held["approval_id"])
    assert request.kind == "review" and request.approvers == ("avery",)
    assert "enterprise" in json.dumps(approvals(bastion).held_result(request))
    approvals(bastion).answer(held["approval_id"], "avery", "approve", channel="api")
    released = read(bastion, token)
    assert "enterprise" in released["result"]["contents"][0]["text"]
    # Not asked again.
    assert bastion.recorder.count("resources/read", uri="customers://plans") == before + 1
    delivered = approvals(bastion).get(held["approval_id"])
    assert delivered.status == "delivered"
    assert approvals(bastion).held_result(delivered) is None  # deleted once delivered
    # The next read is a new call: its result is held again.
    assert read(bastion, token)["error"]["data"]["reason"] == "review_pending"


def test_a_withheld_result_never_reaches_the_agent_and_is_deleted(bastion):
    token = bastion.token("avery", "deskhttp")
    held = read(bastion, token)["error"]["data"]
    # avery holds the result of her own read for review: a person other than her reviews it?
    # The policy names avery as the reviewer of everyone's reads, her own included.
    approvals(bastion).answer(
        held["approval_id"], "avery", "deny", channel="api", reason="not for agents"
    )
    refused = read(bastion, token)["error"]["data"]
    assert refused["reason"] == "review_withheld"
    request = approvals(bastion).get(held["approval_id"])
    assert request.status == "withheld" and approvals(bastion).held_result(request) is None


def test_a_released_result_whose_labels_cannot_be_recorded_stays_held_for_the_next_try(
    tmp_path,
):
    """Redis (the session labels' store) is down when the agent comes back for a released
    result: the result is withheld (its labels must be recorded before it leaves), and kept for
    the next try rather than spent with nothing delivered."""
    require_service("Redis", "127.0.0.1", 6379)

    prefix = f"bastion-test-{uuid.uuid4().hex[:12]}"
    labelled = RULES + 'label(McpResource{"deskhttp/customers://plans"}, "pricing");\n'
    try:
        with (
            RedisRelay() as relay,
            start(
                tmp_path,
                approvals={"wait_seconds": 0},
                policy_extra=labelled,
                gateway={"redis_url": relay.url, "redis_prefix": prefix},
            ) as bastion,
        ):
            token = bastion.token("sam", "deskhttp")
            before = bastion.recorder.count("resources/read", uri="customers://plans")
            held = read(bastion, token)["error"]["data"]
            assert held["reason"] == "review_pending"
            approvals(bastion).answer(held["approval_id"], "avery", "approve", channel="api")
            relay.cut()
            refused = read(bastion, token)["error"]["data"]
            assert refused["reason"] == "labels_unavailable"
            kept = approvals(bastion).get(held["approval_id"])
            assert kept.status == "released"
            assert "enterprise" in json.dumps(approvals(bastion).held_result(kept))
            relay.restore()
            released = read(bastion, token)
            assert "enterprise" in released["result"]["contents"][0]["text"]
            assert approvals(bastion).get(held["approval_id"]).status == "delivered"
            assert bastion.recorder.count("resources/read", uri="customers://plans") == before + 1
    finally:
        drop_redis_keys(prefix)


def test_a_released_result_keeps_the_fields_the_reviewer_withheld(bastion):
    token = bastion.token("sam", "deskhttp")
    held = read(bastion, token, "customers://plans")["error"]["data"]
    approvals(bastion).answer(
        held["approval_id"], "avery", "approve", channel="api", withheld_fields=("plans",)
    )
    released = read(bastion, token)
    assert "enterprise" not in json.dumps(released)


def test_a_waiting_call_keeps_its_client_informed_by_progress(waiting, monkeypatch):
    """A 2025-11-25 client that gave a progress token hears from the held call while it waits,
    so that its own timeout does not end it; the answer given meanwhile lets the call go on."""
    from bastion.gateway import holds

    monkeypatch.setattr(holds, "PROGRESS_SECONDS", 0.3)
    heard: list = []

    async def script(client, seen):
        async def on_progress(progress, total, message):
            heard.append(message)
            if len(heard) == 1:
                [request] = approvals(waiting).listed(status="pending", limit=1)
                approvals(waiting).answer(request.id, "sam", "approve", channel="api")

        result = await client.call_tool(
            "search_customers", {"query": "confirm"}, progress_callback=on_progress
        )
        seen["text"] = result.content[0].text

    seen = waiting.sdk("sam", "deskhttp", "legacy", script)
    assert "customers" in seen["text"]
    assert heard and heard[0] == "waiting for people"


def test_an_approved_call_is_decided_again_and_the_policy_may_still_refuse_it(bastion):
    token = bastion.token("sam", "deskhttp")
    vetoed = {"query": "vetoed"}
    held = raw_call(bastion, token, vetoed, tool="search_customers")["error"]["data"]
    approvals(bastion).answer(held["approval_id"], "sam", "approve", channel="api")
    refused = raw_call(bastion, token, vetoed, tool="search_customers")["error"]["data"]
    assert refused["reason"] == "not_permitted"
    assert approvals(bastion).get(held["approval_id"]).status == "approved"  # not spent


# -- a call held for approval whose result is held for review ----------------------------------


def searches(bastion, query: str) -> int:
    """How many searches of ``query`` reached the upstream."""
    return bastion.recorder.count("tools/call", name="search_customers", arguments={"query": query})


@pytest.mark.parametrize("mode", ERAS)
def test_an_approved_call_runs_once_and_its_result_is_delivered_once_a_reviewer_releases_it(
    bastion, mode
):
    """The approval lets the call run once; its result waits for the reviewer; the retries
    meanwhile are pointed at the review, not asked for a second approval; the released result
    reaches the agent without a second upstream call, masked as the reviewer withheld."""
    query = {"legacy": "Lovelace", "auto": "LOVELACE"}[mode]
    search = {"query": query}

    async def script(client, seen):
        await attempt(client, seen, "calls", "search_customers", search)
        seen["approval"] = last_error(seen)
        approvals(bastion).answer(
            seen["approval"]["approval_id"], "avery", "approve", channel="api"
        )
        await attempt(client, seen, "calls", "search_customers", search)  # runs; result held
        seen["review"] = last_error(seen)
        seen["ran"] = searches(bastion, query)
        await attempt(client, seen, "calls", "search_customers", search)  # still under review
        approvals(bastion).answer(
            seen["review"]["approval_id"],
            "avery",
            "approve",
            channel="api",
            withheld_fields=("customers.*.plan",),
        )
        await attempt(client, seen, "calls", "search_customers", search)  # the released result
        await attempt(client, seen, "calls", "search_customers", search)  # a new call

    seen = bastion.sdk("sam", "deskhttp", mode, script)
    approval, review = seen["approval"], seen["review"]
    held, running, waiting, released, again = seen["calls"]
    assert (approval["code"], approval["reason"]) == (-32008, "approval_pending"), held
    assert (review["code"], review["reason"]) == (-32008, "review_pending"), running
    assert waiting[0] == "error", waiting
    assert (waiting[2]["reason"], waiting[2]["approval_id"]) == (
        "review_pending",
        review["approval_id"],
    )
    assert seen["ran"] == 1
    assert released[0] == "ok", released
    assert "Ada Lovelace" in released[1]
    assert "enterprise" not in released[1]  # the plan, withheld by the reviewer
    assert "ada@example.com" not in released[1]  # the email, masked by the policy for sam
    assert again[0] == "error" and again[2]["reason"] == "approval_pending", again
    assert again[2]["approval_id"] not in (approval["approval_id"], review["approval_id"])
    assert searches(bastion, query) == 1
    used = approvals(bastion).get(approval["approval_id"])
    delivered = approvals(bastion).get(review["approval_id"])
    assert (used.status, delivered.status) == ("used", "delivered")
    assert delivered.decision_id == used.used_by  # the result of the call the approval unlocked


@pytest.mark.parametrize("mode", ERAS)
def test_a_waiting_client_gets_the_released_result_of_its_approved_call_in_one_request(
    waiting, mode
):
    """The user confirms their agent's call on the page (2026-07-28: input_required, then the
    retry with bastion's requestState; 2025-11-25: elicitation during the call), the call runs,
    a reviewer releases its result while the client waits, and the one tools/call returns it."""
    query = {"legacy": "hopper", "auto": "Hopper"}[mode]
    reviewed: list = []

    def review_once_held(approval_id: str) -> None:
        def held() -> list:
            used = approvals(waiting).get(approval_id)
            return [
                r
                for r in approvals(waiting).listed(status="pending")
                if r.kind == "review" and used.used_by is not None and r.decision_id == used.used_by
            ]

        if eventually(held, every=0.05):
            reviewed.append(
                approvals(waiting).answer(
                    held()[0].id,
                    "sam",
                    "approve",
                    channel="api",
                    withheld_fields=("customers.*.plan",),
                )
            )

    async def elicit(context, params):
        request_id = str(params.url).rsplit("/", 1)[1]
        approvals(waiting).answer(request_id, "sam", "approve", channel="elicitation")
        threading.Thread(target=review_once_held, args=(request_id,), daemon=True).start()
        return types.ElicitResult(action="accept")

    async def script(client, seen):
        await attempt(client, seen, "calls", "search_customers", {"query": query})

    seen = waiting.sdk("sam", "deskhttp", mode, script, elicitation_callback=elicit)
    [answer] = seen["calls"]
    assert answer[0] == "ok", answer
    assert "Grace Hopper" in answer[1] and '"team"' not in answer[1]
    assert searches(waiting, query) == 1
    [review] = reviewed
    assert approvals(waiting).get(review.id).status == "delivered"


def retry(bastion, token: str, arguments: dict, request_id: str | None = None) -> dict:
    """A 2026-07-28 tools/call of search_customers; with ``request_id``, the retry of that
    request, with the requestState bastion would give this token's user and chain of agents
    for it (a direct grant's: its agent alone)."""
    params: dict = {"name": "search_customers", "arguments": arguments}
    if request_id is not None:
        states = bastion.app.state.gateway.states
        params["requestState"] = states.sign(request_id, "sam", (agent_of(token),))
    response = bastion.http.post(
        bastion.mcp_url("deskhttp"),
        json=modern_request(1, "tools/call", params),
        headers=modern_headers(token, "tools/call", "search_customers"),
    )
    assert response.status_code == 200, response.text
    return messages(response)[-1]


def agent_of(token: str) -> str:
    """The agent (OAuth client) the access token ``token`` was issued to (its claim)."""
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["client_id"]


def reviewed_call(bastion, token: str, search: dict, release: bool = True) -> tuple[str, str]:
    """Hold ``search`` for approval, approve it, run it, and (with ``release``) release its
    result: the approval's id and the review's."""
    approval = retry(bastion, token, search)["error"]["data"]
    assert approval["reason"] == "approval_pending", approval
    approvals(bastion).answer(approval["approval_id"], "avery", "approve", channel="api")
    review = retry(bastion, token, search, approval["approval_id"])["error"]["data"]
    assert review["reason"] == "review_pending", review
    if release:
        approvals(bastion).answer(review["approval_id"], "avery", "approve", channel="api")
    return approval["approval_id"], review["approval_id"]


def test_a_retry_naming_the_approval_or_review_of_another_call_is_refused(bastion):
    token = bastion.token("sam", "deskhttp")
    first, other = {"query": "lOvelace"}, {"query": "loVelace"}
    approved, released = reviewed_call(bastion, token, first)
    unspent = retry(bastion, token, {"query": "lovElace"})["error"]["data"]["approval_id"]
    approvals(bastion).answer(unspent, "avery", "approve", channel="api")
    for named in (released, approved, unspent):
        refused = retry(bastion, token, other, named)["error"]["data"]
        assert refused["reason"] == "approval_mismatch", (named, refused)
    assert searches(bastion, other["query"]) == 0
    assert approvals(bastion).get(released).status == "released"  # still for its own call
    assert approvals(bastion).get(unspent).status == "approved"
    assert "result" in retry(bastion, token, first, released)


def test_an_approval_is_spent_once_whatever_the_retries_name(bastion):
    """Retries with the approval's requestState, while the result is under review and after it
    was delivered, neither run the call again nor deliver its result twice."""
    token = bastion.token("sam", "deskhttp")
    search = {"query": "LOvelace"}
    approved, under_review = reviewed_call(bastion, token, search, release=False)
    again = retry(bastion, token, search, approved)["error"]["data"]
    assert (again["reason"], again["approval_id"]) == ("review_pending", under_review)
    approvals(bastion).answer(under_review, "avery", "approve", channel="api")
    assert "Ada Lovelace" in json.dumps(retry(bastion, token, search, approved)["result"])
    for named in (approved, under_review):
        spent = retry(bastion, token, search, named)["error"]["data"]
        assert spent["reason"] == "approval_used", (named, spent)
    anew = retry(bastion, token, search)["error"]["data"]
    assert anew["reason"] == "approval_pending" and anew["approval_id"] != approved
    assert searches(bastion, search["query"]) == 1


def test_a_released_result_reaches_no_other_agent_of_the_same_user(bastion):
    token, other = bastion.token("sam", "deskhttp"), bastion.token("sam", "deskhttp")
    search = {"query": "LOVelace"}
    approved, released = reviewed_call(bastion, token, search)
    for named in (None, approved, released):
        refused = retry(bastion, other, search, named)["error"]["data"]
        expected = "approval_pending" if named is None else "approval_mismatch"
        assert refused["reason"] == expected, (named, refused)
    assert approvals(bastion).get(released).status == "released"
    assert "Ada Lovelace" in json.dumps(retry(bastion, token, search)["result"])
    assert searches(bastion, search["query"]) == 1


def test_a_withheld_result_is_refused_and_not_asked_for_a_second_approval(bastion):
    token = bastion.token("sam", "deskhttp")
    search = {"query": "LOVElace"}
    approved, withheld = reviewed_call(bastion, token, search, release=False)
    approvals(bastion).answer(withheld, "avery", "deny", channel="api", reason="not for agents")
    for named in (None, approved, withheld):
        refused = retry(bastion, token, search, named)["error"]["data"]
        assert refused["reason"] == "review_withheld", (named, refused)
    assert searches(bastion, search["query"]) == 1


def test_a_result_under_review_is_not_fetched_by_running_its_call_again(bastion):
    """The review was lifted while the result waited: the approval, spent on the run whose
    result is held, lets nothing run again; the held result is still the reviewer's to release."""
    token = bastion.token("sam", "deskhttp")
    search = {"query": "Turing"}
    lifted = ("review_lifted", Entity("Tool", "deskhttp/search_customers"))
    approved, under_review = reviewed_call(bastion, token, search, release=False)
    bastion.apply(inserts=[lifted])
    try:
        for named in (None, approved, under_review):
            answer = retry(bastion, token, search, named)
            assert "error" in answer, answer  # not a result of the call run again
            held = answer["error"]["data"]
            assert (held["reason"], held["approval_id"]) == ("review_pending", under_review)
        assert searches(bastion, search["query"]) == 1
    finally:
        bastion.apply(deletes=[lifted])


# -- a retry while the approved run is upstream ---------------------------------------------

LONG_RUN = "run_until_released"


def lab_call(
    bastion, token: str, arguments: dict, request_id: str | None = None, url: str | None = None
) -> dict:
    """A 2026-07-28 tools/call of the lab's ``run_until_released`` (to ``url``: another
    replica's /mcp/labhttp); with ``request_id``, the retry naming that request (as `retry`)."""
    params: dict = {"name": LONG_RUN, "arguments": arguments}
    if request_id is not None:
        states = bastion.app.state.gateway.states
        params["requestState"] = states.sign(request_id, "sam", (agent_of(token),))
    response = bastion.http.post(
        url or bastion.mcp_url("labhttp"),
        json=modern_request(1, "tools/call", params),
        headers=modern_headers(token, "tools/call", LONG_RUN),
        timeout=60,
    )
    assert response.status_code == 200, response.text
    return messages(response)[-1]


def runs(bastion, tag: str) -> int:
    """How many times the lab's ``run_until_released`` started with ``tag`` (each is a run
    upstream)."""
    if not bastion.lab_trace.exists():
        return 0
    lines = bastion.lab_trace.read_text().splitlines()
    return sum(1 for line in lines if json.loads(line) == {"kind": "run-started", "tag": tag})


def release_run(bastion, tag: str) -> None:
    """Let the lab's runs of ``tag`` answer."""
    with bastion.lab_trace.open("a") as trace:
        trace.write(json.dumps({"kind": "release", "tag": tag}) + "\n")


def wait_for(condition, what: str) -> None:
    assert eventually(condition, every=0.02), f"never: {what}"


def approved_run(bastion, token: str, arguments: dict) -> tuple[str, threading.Thread, dict]:
    """Hold the call, have avery approve it, and send it again in the background, named by its
    approval: the approval's id, the thread waiting for that call's answer (in ``ran``), once
    its run has started upstream (and stays there until `release_run`)."""
    held = lab_call(bastion, token, arguments)["error"]["data"]
    assert held["reason"] == "approval_pending", held
    approvals(bastion).answer(held["approval_id"], "avery", "approve", channel="api")
    ran: dict = {}

    def run() -> None:
        ran["answer"] = lab_call(bastion, token, arguments, held["approval_id"])

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    wait_for(lambda: runs(bastion, arguments["tag"]) == 1, "the approved run started")
    return held["approval_id"], thread, ran


def requests_of(bastion, tag: str) -> list:
    """The approval requests (approvals and reviews) of the lab calls of ``tag``, oldest first."""
    found = approvals(bastion).listed(limit=200)
    return sorted(
        (r for r in found if isinstance(r.arguments, dict) and r.arguments.get("tag") == tag),
        key=lambda r: r.created_at,
    )


def in_progress(answer: dict) -> tuple:
    error = answer.get("error") or {}
    data = error.get("data") or {}
    return error.get("code"), data.get("reason"), data.get("approval_id")


def test_a_retry_while_the_approved_run_is_upstream_is_told_so_and_finds_its_review_after(
    bastion,
):
    """sam's agent retries an approved call held for approval and review while its run is still
    upstream (nothing holds its result yet): on this replica naming nothing, on the other, and
    naming the approval. Each retry is told the approved run is in progress (-32008,
    ``approval_in_progress``, naming the approval): none is held for a new approval, nor
    refused as used. Once the run ends, the retry finds its result under review; the call ran
    once, and the only requests are its approval and its review. (Before, the retry naming
    nothing was held for a new approval, which, given, ran the call again.)"""
    token = bastion.token("sam", "labhttp")
    tag = f"in-progress-{uuid.uuid4().hex[:8]}"
    arguments = {"tag": tag, "reviewed": True}
    approval, thread, ran = approved_run(bastion, token, arguments)
    try:
        here = lab_call(bastion, token, arguments)
        there = lab_call(bastion, token, arguments, url=f"{bastion.replicas[0]}/mcp/labhttp")
        named = lab_call(bastion, token, arguments, approval)
    finally:
        release_run(bastion, tag)
        thread.join(timeout=PATIENCE)
    for answer in (here, there, named):
        assert in_progress(answer) == (-32008, "approval_in_progress", approval), answer
    assert "in progress" in here["error"]["message"], here
    review = ran["answer"]["error"]["data"]
    assert review["reason"] == "review_pending", review
    after = lab_call(bastion, token, arguments)["error"]["data"]
    assert (after["reason"], after["approval_id"]) == ("review_pending", review["approval_id"])
    assert runs(bastion, tag) == 1
    assert [(r.kind, r.id) for r in requests_of(bastion, tag)] == [
        ("approval", approval),
        ("review", review["approval_id"]),
    ]
    approvals(bastion).answer(review["approval_id"], "avery", "approve", channel="api")
    released = lab_call(bastion, token, arguments)
    assert f"released {tag}" in json.dumps(released.get("result")), released
    assert runs(bastion, tag) == 1


def test_a_retry_of_a_call_held_for_approval_only_never_runs_it_again_while_it_runs(bastion):
    """The same for a call held for approval only, whose single-use approval its run in flight
    has spent: the retries meanwhile are told the run is in progress, not held for a new
    approval. Once the run has answered its own request, a retry naming the approval is
    refused ``approval_used``, and one naming nothing is a new call, held anew."""
    token = bastion.token("sam", "labhttp")
    tag = f"in-progress-only-{uuid.uuid4().hex[:8]}"
    arguments = {"tag": tag}
    approval, thread, ran = approved_run(bastion, token, arguments)
    try:
        here = lab_call(bastion, token, arguments)
        there = lab_call(bastion, token, arguments, url=f"{bastion.replicas[0]}/mcp/labhttp")
    finally:
        release_run(bastion, tag)
        thread.join(timeout=PATIENCE)
    for answer in (here, there):
        assert in_progress(answer) == (-32008, "approval_in_progress", approval), answer
    assert f"released {tag}" in json.dumps(ran["answer"].get("result")), ran
    assert [(r.kind, r.id) for r in requests_of(bastion, tag)] == [("approval", approval)]
    used = lab_call(bastion, token, arguments, approval)["error"]["data"]
    assert used["reason"] == "approval_used", used
    anew = lab_call(bastion, token, arguments)["error"]["data"]
    assert (anew["reason"], anew["approval_id"] != approval) == ("approval_pending", True), anew
    assert runs(bastion, tag) == 1


def test_a_waiting_retry_waits_for_the_approved_run_then_for_its_review(waiting):
    """A client that waits (``wait_seconds``) and retries while the approved run is upstream
    waits for that run in the same request, then for the review of its result: it is answered
    ``review_pending`` naming that run's review, never held for a new approval."""
    token = waiting.token("sam", "labhttp")
    tag = f"in-progress-waiting-{uuid.uuid4().hex[:8]}"
    arguments = {"tag": tag, "reviewed": True}
    first: dict = {}
    thread = threading.Thread(
        target=lambda: first.update(answer=lab_call(waiting, token, arguments)), daemon=True
    )
    thread.start()  # held, and waits for avery
    wait_for(lambda: requests_of(waiting, tag), "the call was held")
    [approval] = requests_of(waiting, tag)
    approvals(waiting).answer(approval.id, "avery", "approve", channel="api")
    wait_for(lambda: runs(waiting, tag) == 1, "the approved run started")
    retried: dict = {}
    retry = threading.Thread(
        target=lambda: retried.update(answer=lab_call(waiting, token, arguments)), daemon=True
    )
    digest = waiting.app.state.gateway.enforcer.digest(arguments)
    try:
        retry.start()

        def told_in_progress() -> bool:
            waiting.flush()
            return any(
                r.arguments_digest == digest and r.reason == "approval_in_progress"
                for _, r in waiting.records.after(0, 100000)
            )

        wait_for(told_in_progress, "the retry was held while the run is upstream")
    finally:
        release_run(waiting, tag)
        thread.join(timeout=PATIENCE)
        retry.join(timeout=PATIENCE)
    review = first["answer"]["error"]["data"]
    assert review["reason"] == "review_pending", first
    answer = retried["answer"]["error"]["data"]
    assert (answer["reason"], answer["approval_id"]) == ("review_pending", review["approval_id"])
    assert runs(waiting, tag) == 1
    assert [r.kind for r in requests_of(waiting, tag)] == ["approval", "review"]


def test_an_approved_call_sent_at_once_to_two_replicas_on_postgresql_runs_once(
    tmp_path_factory, postgres_url
):
    """Two bastion replicas on one PostgreSQL: the agent sends its approved call eight times at
    the same moment, half to each. The upstream runs it once; every other copy is refused
    (approval_used), told that run is in progress, or (once it has ended) held for a new
    approval, never run."""
    with start(
        tmp_path_factory.mktemp("holds-pg"),
        approvals={"wait_seconds": 0},
        policy_extra=RULES,
        replicas=1,
        database=postgres_url,
    ) as running:
        token = running.token("sam", "deskhttp")
        email = {**EMAIL, "subject": "at once"}
        held = raw_call(running, token, email)["error"]["data"]
        approvals(running).answer(held["approval_id"], "avery", "approve", channel="api")
        urls = [running.mcp_url("deskhttp"), f"{running.replicas[0]}/mcp/deskhttp"]
        start_together = threading.Barrier(8)
        answers: list = [None] * 8

        def send(i: int) -> None:
            start_together.wait()
            answers[i] = raw_call(running, token, email, url=urls[i % 2])

        threads = [threading.Thread(target=send, args=(i,)) for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        ran = [a for a in answers if "result" in a]
        assert len(ran) == 1, answers
        reasons = {a["error"]["data"]["reason"] for a in answers if "error" in a}
        # Sent while the run is upstream: told it is in progress; after: a new call.
        assert reasons <= {"approval_used", "approval_in_progress", "approval_pending"}, answers
        sent = [
            m
            for m in running.recorder.messages()
            if m.get("method") == "tools/call"
            and m.get("params", {}).get("arguments", {}).get("subject") == "at once"
        ]
        assert len(sent) == 1
        assert approvals(running).get(held["approval_id"]).status == "used"


# -- a failed run that never reached the upstream ----------------------------------------------

# Reads of the lab's open note through more upstreams wait for the user's confirmation: one that
# nothing listens for yet ("labgone": its connections are refused), one over stdio whose program
# is not there yet ("labspawn"), one behind a relay that drops the requests it is sent once told
# to ("labcut"); over stdio, programs each test writes ("labexit", "labrefuse", "labquit",
# "labmute", with a timeout of 2 s, "labstall" and "labstop", with one of 30 s); an HTTP upstream
# whose initialize names a protocol version no header can carry ("labheader"); the lab with one
# upstream session per user, one at most ("labroom"); the lab in 2025-11-25, which offers
# subscriptions, served only while a test serves it ("labsub"); the lab with a timeout of 1 s
# ("labrounds"); and the lab behind each user's own credentials, which nobody has connected
# ("labconnect").
UNSENT_SERVERS = (
    "labgone",
    "labspawn",
    "labcut",
    "labexit",
    "labrefuse",
    "labquit",
    "labmute",
    "labheader",
    "labroom",
    "labsub",
    "labstall",
    "labstop",
    "labrounds",
    "labconnect",
)
UNSENT_RULES = "".join(
    f'requires_approval(_user: User, "read", McpResource{{"{server}/lab://open"}});\n'
    for server in UNSENT_SERVERS
)
# labsub's second resource: one no test has subscribed to before (the upstream's subscriptions
# serve every client: one subscribed to already is not asked for again).
LATER = "lab://later"
UNSENT_RULES += f'requires_approval(_user: User, "read", McpResource{{"labsub/{LATER}"}});\n'
# labrounds' tool asks its client round after round (each round within its timeout of 1 s): the
# user confirms each call of it.
ROUNDS = "ask_until_done"
UNSENT_RULES += f'requires_approval(_user: User, "call", Tool{{"labrounds/{ROUNDS}"}});\n'


def lab_app() -> Recorder:
    """The lab MCP server as an ASGI app (2026-07-28), recording what reaches it."""
    lab = fresh_module("lab_server_unsent", LAB)
    return Recorder(lab.server.streamable_http_app(streamable_http_path="/mcp"))


class BadVersion:
    """An HTTP MCP server (2025-11-25 only) whose ``initialize`` names the protocol version
    ``2025-11-25`` followed by a line break and a header of its own: bastion would send it back
    in ``MCP-Protocol-Version``. It answers any other request, and keeps their methods."""

    def __init__(self) -> None:
        self.methods: list[str] = []

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        body, more = b"", True
        while more:
            part = await receive()
            body, more = body + part.get("body", b""), part.get("more_body", False)
        message = json.loads(body)
        if "id" not in message:
            await send({"type": "http.response.start", "status": 202, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        self.methods.append(message["method"])
        if message["method"] == "server/discover":
            answer = {"error": {"code": -32601, "message": "no server/discover"}}
        elif message["method"] == "initialize":
            info = {"name": "badversion", "version": "1"}
            answer = {
                "result": {
                    "protocolVersion": "2025-11-25\r\nx-injected: 1",
                    "capabilities": {"resources": {}},
                    "serverInfo": info,
                }
            }
        else:
            answer = {"result": {"contents": [{"uri": "lab://open", "text": "read"}]}}
        data = json.dumps({"jsonrpc": "2.0", "id": message["id"], **answer}).encode()
        headers = [(b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": data})


@dataclass
class Unsent:
    bastion: Running
    gone_sock: socket.socket  # labgone's port: bound, nothing listening until a test serves
    program: Path  # labspawn's program, not there until a test writes it
    cut_app: Recorder  # the lab behind the relay
    relay: Relay  # to the lab; `Relay.drop` makes it an upstream that takes a request and fails
    folder: Path  # where the programs of the stdio upstreams are written (`write_program`)
    bad_version: BadVersion  # labheader's server
    room_trace: Path  # the trace of labroom's lab (`release_run`)
    # labsub's port, kept bound (nothing listening) for it: a test serves on a socket of its own.
    sub_sock: socket.socket
    rounds_app: Recorder  # labrounds' lab (its requests, one per round of a run)

    def program_of(self, server: str) -> Path:
        return self.folder / server

    def write_program(self, server: str, text: str) -> None:
        program = self.program_of(server)
        program.write_text(text)
        program.chmod(0o755)


@pytest.fixture(scope="module")
def unsent(tmp_path_factory):
    """bastion with "labgone", "labspawn" and "labcut" (`UNSENT_RULES`)."""
    folder = tmp_path_factory.mktemp("holds-unsent")
    gone_sock = free_socket()
    gone_url = f"http://127.0.0.1:{gone_sock.getsockname()[1]}"
    sub_sock = free_socket()
    program = folder / "lab-later"
    cut_app = lab_app()
    bad_version = BadVersion()
    room_lab = fresh_module("lab_server_room", LAB)
    room_lab.TRACE = str(folder / "room-trace.jsonl")
    room_app = room_lab.server.streamable_http_app(streamable_http_path="/mcp")
    rounds_app = lab_app()
    with contextlib.ExitStack() as stack:
        cut_url = stack.enter_context(serve(cut_app, free_socket()))
        relay = Relay(("127.0.0.1", int(cut_url.rsplit(":", 1)[1])))
        stack.callback(relay.close)
        header_url = stack.enter_context(serve(bad_version, free_socket()))
        room_url = stack.enter_context(serve(room_app, free_socket()))
        rounds_url = stack.enter_context(serve(rounds_app, free_socket()))
        more = (
            {"name": "labgone", "url": f"{gone_url}/mcp"},
            {"name": "labspawn", "command": str(program)},
            {"name": "labcut", "url": f"http://127.0.0.1:{relay.port}/mcp"},
            *(
                {"name": server, "command": str(folder / server), "timeout": 10}
                for server in ("labexit", "labrefuse", "labquit")
            ),
            {"name": "labmute", "command": str(folder / "labmute"), "timeout": 2},
            {"name": "labheader", "url": f"{header_url}/mcp"},
            {"name": "labroom", "url": f"{room_url}/mcp", "session": "per_user", "max_sessions": 1},
            {"name": "labsub", "url": f"http://127.0.0.1:{sub_sock.getsockname()[1]}/mcp"},
            *(
                {"name": server, "command": str(folder / server), "timeout": 30}
                for server in ("labstall", "labstop")
            ),
            {"name": "labrounds", "url": f"{rounds_url}/mcp", "timeout": 1},
            {"name": "labconnect", "url": f"{room_url}/mcp", "auth": "per_user"},
        )
        running = stack.enter_context(
            start(
                folder,
                approvals={"wait_seconds": 0},
                policy_extra=RULES + UNSENT_RULES,
                more_upstreams=more,
            )
        )
        running.apply(
            [
                parse_fact(line)
                for server in UNSENT_SERVERS
                for line in (
                    f'has_relation(McpServer{{"{server}"}}, "team", Team{{"support"}})',
                    f'has_relation(McpResource{{"{server}/lab://open"}}, "server",'
                    f' McpServer{{"{server}"}})',
                )
            ]
            + [
                parse_fact(
                    f'has_relation(Tool{{"labroom/{LONG_RUN}"}}, "server", McpServer{{"labroom"}})'
                ),
                parse_fact(
                    f'has_relation(McpResource{{"labsub/{LATER}"}}, "server", McpServer{{"labsub"}})'
                ),
                parse_fact(
                    f'has_relation(Tool{{"labrounds/{ROUNDS}"}}, "server", McpServer{{"labrounds"}})'
                ),
                parse_fact('has_role(User{"avery"}, "admin", McpServer{"labroom"})'),
            ]
        )
        yield Unsent(
            running,
            gone_sock,
            program,
            cut_app,
            relay,
            folder,
            bad_version,
            Path(room_lab.TRACE),
            sub_sock,
            rounds_app,
        )


def read_on(bastion, server: str, token: str, uri: str = "lab://open") -> dict:
    response = bastion.http.post(
        bastion.mcp_url(server),
        json=modern_request(1, "resources/read", {"uri": uri}),
        headers=modern_headers(token, "resources/read", uri),
    )
    assert response.status_code == 200, response.text
    return messages(response)[-1]


def test_an_approval_whose_upstream_refused_the_connection_is_not_spent(unsent):
    """Nothing listens at the upstream's address: its connection is refused, so the approved
    read provably never left bastion. The person is not asked again: the approval is approved
    still (its expiry unchanged), and the retry, once the upstream is up, goes through with it."""
    bastion = unsent.bastion
    token = bastion.token("sam", "labgone")
    held = read_on(bastion, "labgone", token)["error"]["data"]
    assert held["reason"] == "approval_pending", held
    approvals(bastion).answer(held["approval_id"], "sam", "approve", channel="api")
    approved = approvals(bastion).get(held["approval_id"])
    failed = read_on(bastion, "labgone", token)["error"]
    assert failed["code"] == -32000 and "connect" in failed["message"], failed
    kept = approvals(bastion).get(held["approval_id"])
    assert kept.status == "approved", kept
    assert (kept.used_by, kept.used_at, kept.running_until) == (None, None, None)
    assert kept.expires_at == approved.expires_at
    (event,) = approvals(bastion).audit.events(kind="approval.unspent", request_id=kept.id)
    assert event.detail["decision_id"] == failed["data"]["decision_id"]
    assert event.detail["error"] == "ConnectionRefusedError"
    bastion.flush()
    record = bastion.records.get(failed["data"]["decision_id"])
    assert record.result == "allow" and record.reason == "upstream error -32000"
    app = lab_app()
    with serve(app, unsent.gone_sock):
        answer = read_on(bastion, "labgone", token)
    assert answer["result"]["contents"][0]["text"] == "anyone on the team may read this", answer
    assert app.count("resources/read", uri="lab://open") == 1
    used = approvals(bastion).get(held["approval_id"])
    assert used.status == "used" and used.used_by != failed["data"]["decision_id"]


def test_an_approval_whose_upstream_took_the_request_and_dropped_it_is_spent(unsent):
    """The upstream took the connection, and the request, then closed it without an answer:
    bastion cannot tell whether it acted, so the approval is spent and the retry is held anew."""
    bastion, cut_app, relay = unsent.bastion, unsent.cut_app, unsent.relay
    token = bastion.token("sam", "labcut")
    listed = bastion.http.post(
        bastion.mcp_url("labcut"),
        json=modern_request(1, "resources/list", {}),
        headers=modern_headers(token, "resources/list"),
    )
    assert "result" in messages(listed)[-1], listed.text  # the upstream was reached once
    held = read_on(bastion, "labcut", token)["error"]["data"]
    assert held["reason"] == "approval_pending", held
    approvals(bastion).answer(held["approval_id"], "sam", "approve", channel="api")
    relay.drop()
    failed = read_on(bastion, "labcut", token)["error"]
    assert failed["code"] == -32000 and list(failed["data"]) == ["decision_id"], failed
    spent = approvals(bastion).get(held["approval_id"])
    assert spent.status == "used" and spent.used_by == failed["data"]["decision_id"]
    assert approvals(bastion).audit.events(kind="approval.unspent", request_id=spent.id) == []
    again = read_on(bastion, "labcut", token)["error"]["data"]
    assert again["reason"] == "approval_pending" and again["approval_id"] != spent.id, again
    assert cut_app.count("resources/read", uri="lab://open") == 0


def test_an_approval_whose_upstream_program_could_not_be_started_is_not_spent(unsent):
    """The stdio upstream's program is not there: it cannot be started, so the approved read
    never left bastion. The approval is given back, and the retry, once the program is there,
    goes through with it."""
    bastion = unsent.bastion
    token = bastion.token("sam", "labspawn")
    held = read_on(bastion, "labspawn", token)["error"]["data"]
    assert held["reason"] == "approval_pending", held
    approvals(bastion).answer(held["approval_id"], "sam", "approve", channel="api")
    failed = read_on(bastion, "labspawn", token)["error"]
    assert failed["code"] == -32000 and "cannot start" in failed["message"], failed
    assert approvals(bastion).get(held["approval_id"]).status == "approved"
    (event,) = approvals(bastion).audit.events(
        kind="approval.unspent", request_id=held["approval_id"]
    )
    assert event.detail["error"] == "FileNotFoundError"
    unsent.program.write_text(
        f"#!/bin/sh\nexec {shlex.quote(sys.executable)} {shlex.quote(str(LAB))}\n"
    )
    unsent.program.chmod(0o755)
    answer = read_on(bastion, "labspawn", token)
    assert answer["result"]["contents"][0]["text"] == "anyone on the team may read this", answer
    assert approvals(bastion).get(held["approval_id"]).status == "used"


LAB_PROGRAM = f"#!/bin/sh\nexec {shlex.quote(sys.executable)} {shlex.quote(str(LAB))}\n"


def approved_read(unsent: Unsent, server: str) -> tuple[str, str]:
    """sam's read on ``server``, held and approved by sam: sam's token and the approval's id."""
    bastion = unsent.bastion
    token = bastion.token("sam", server)
    held = read_on(bastion, server, token)["error"]["data"]
    assert held["reason"] == "approval_pending", held
    approvals(bastion).answer(held["approval_id"], "sam", "approve", channel="api")
    return token, held["approval_id"]


def given_back(bastion, approval_id: str, failed: dict) -> dict:
    """The approval the read that ``failed`` spent is approved again, as it was, with an event
    `approval.unspent` naming that read's decision: that event's detail."""
    kept = approvals(bastion).get(approval_id)
    assert kept.status == "approved", kept
    assert (kept.used_by, kept.used_at, kept.running_until) == (None, None, None)
    events = approvals(bastion).audit.events(kind="approval.unspent", request_id=approval_id)
    (event,) = [e for e in events if e.detail["decision_id"] == failed["data"]["decision_id"]]
    return event.detail


def test_an_approval_whose_stdio_program_exits_before_its_handshake_answers_is_not_spent(unsent):
    """The program starts and exits before it answers ``initialize``: the connection was never
    made, so the approved read never left bastion. The approval is given back, and the retry,
    once the program is the lab, goes through with it (the person is not asked again)."""
    bastion = unsent.bastion
    unsent.write_program("labexit", "#!/bin/sh\nexit 3\n")
    token, approval_id = approved_read(unsent, "labexit")
    failed = read_on(bastion, "labexit", token)["error"]
    assert failed["code"] == -32000 and "labexit" in failed["message"], failed
    detail = given_back(bastion, approval_id, failed)
    assert detail["error"] == "UpstreamFailure" and detail["message"] == failed["message"]
    unsent.write_program("labexit", LAB_PROGRAM)
    answer = read_on(bastion, "labexit", token)
    assert answer["result"]["contents"][0]["text"] == "anyone on the team may read this", answer
    assert approvals(bastion).get(approval_id).status == "used"


def test_an_approval_whose_stdio_program_never_answers_its_handshake_is_not_spent(unsent):
    """The program starts and never answers ``initialize``: its start fails at the upstream's
    timeout, before the approved read was sent. The approval is given back each time, and the
    retry runs without the person being asked again."""
    bastion = unsent.bastion
    unsent.write_program("labmute", "#!/bin/sh\nexec sleep 60\n")
    token, approval_id = approved_read(unsent, "labmute")
    for _ in range(2):
        failed = read_on(bastion, "labmute", token)["error"]
        assert failed["code"] == -32000 and "did not start" in failed["message"], failed
        given_back(bastion, approval_id, failed)


REFUSES_INITIALIZE = """\
import json, sys
for line in sys.stdin:
    message = json.loads(line)
    if "id" in message:
        error = {"code": -32602, "message": "unsupported protocol version"}
        print(json.dumps({"jsonrpc": "2.0", "id": message["id"], "error": error}), flush=True)
"""


def test_an_approval_whose_stdio_program_refuses_initialize_is_not_spent(unsent):
    """The program answers ``initialize`` with an error: bastion never sent the read. The
    approval is given back, and the retry, once the program is the lab, goes through."""
    bastion = unsent.bastion
    unsent.write_program("labrefuse", f"#!{sys.executable}\n{REFUSES_INITIALIZE}")
    token, approval_id = approved_read(unsent, "labrefuse")
    failed = read_on(bastion, "labrefuse", token)["error"]
    assert failed["code"] == -32000 and "refused initialize" in failed["message"], failed
    assert given_back(bastion, approval_id, failed)["error"] == "UpstreamError"
    unsent.write_program("labrefuse", LAB_PROGRAM)
    answer = read_on(bastion, "labrefuse", token)
    assert answer["result"]["contents"][0]["text"] == "anyone on the team may read this", answer
    assert approvals(bastion).get(approval_id).status == "used"


QUITS_ON_THE_CALL = """\
import json, sys
for line in sys.stdin:
    message = json.loads(line)
    if message.get("method") == "initialize":
        result = {
            "protocolVersion": "2025-11-25",
            "capabilities": {"resources": {}},
            "serverInfo": {"name": "quits", "version": "1"},
        }
        print(json.dumps({"jsonrpc": "2.0", "id": message["id"], "result": result}), flush=True)
    elif "id" in message:
        with open(sys.argv[1], "a") as received:
            received.write(message["method"] + "\\n")
        sys.exit(1)
"""


def test_an_approval_whose_stdio_program_took_the_call_and_exited_is_spent(unsent):
    """The program answers its handshake, reads the approved call, and exits without answering:
    it may have acted, so the approval is spent and the retry is held anew."""
    bastion = unsent.bastion
    received = unsent.folder / "labquit-received"
    unsent.write_program(
        "labquit",
        f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -c "
        f"{shlex.quote(QUITS_ON_THE_CALL)} {shlex.quote(str(received))}\n",
    )
    token, approval_id = approved_read(unsent, "labquit")
    failed = read_on(bastion, "labquit", token)["error"]
    assert failed["code"] == -32000, failed
    assert received.read_text() == "resources/read\n"
    spent = approvals(bastion).get(approval_id)
    assert spent.status == "used" and spent.used_by == failed["data"]["decision_id"]
    assert approvals(bastion).audit.events(kind="approval.unspent", request_id=approval_id) == []
    again = read_on(bastion, "labquit", token)["error"]["data"]
    assert again["reason"] == "approval_pending" and again["approval_id"] != approval_id, again


def test_an_approval_whose_request_has_a_header_bastion_refuses_to_send_is_not_spent(unsent):
    """The upstream's ``initialize`` named a protocol version with a line break in it, which
    bastion refuses to send in the ``MCP-Protocol-Version`` header of the read (it would start a
    header of the upstream's own choosing): nothing of the read was written. The approval is
    given back each time, and the retry runs without the person being asked again."""
    bastion = unsent.bastion
    token, approval_id = approved_read(unsent, "labheader")
    failed = read_on(bastion, "labheader", token)["error"]
    assert failed["code"] == -32000 and "header" in failed["message"], failed
    given_back(bastion, approval_id, failed)
    again = read_on(bastion, "labheader", token)["error"]
    assert again["code"] == -32000 and "header" in again["message"], again
    given_back(bastion, approval_id, again)
    assert "resources/read" not in unsent.bad_version.methods
    assert "initialize" in unsent.bad_version.methods


def test_an_approval_whose_per_user_upstream_session_had_no_room_is_not_spent(unsent):
    """labroom keeps one upstream session per user, one at most, and avery's is busy with a call
    that stays upstream: sam's approved read finds no room for a session of sam's, so it never
    left bastion. The approval is given back; once avery's call ends, the retry goes through."""
    bastion, trace = unsent.bastion, unsent.room_trace
    avery = bastion.token("avery", "labroom")
    ran: dict = {}

    def run() -> None:
        response = bastion.http.post(
            bastion.mcp_url("labroom"),
            json=modern_request(1, "tools/call", {"name": LONG_RUN, "arguments": {"tag": "room"}}),
            headers=modern_headers(avery, "tools/call", LONG_RUN),
            timeout=60,
        )
        ran["answer"] = messages(response)[-1]

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    wait_for(
        lambda: "answer" in ran or (trace.exists() and "run-started" in trace.read_text()),
        "avery's call runs",
    )
    assert "answer" not in ran, ran
    token, approval_id = approved_read(unsent, "labroom")
    failed = read_on(bastion, "labroom", token)["error"]
    assert failed["code"] == -32000 and "max_sessions" in failed["message"], failed
    assert given_back(bastion, approval_id, failed)["error"] == "RpcError"
    with trace.open("a") as out:
        out.write(json.dumps({"kind": "release", "tag": "room"}) + "\n")
    thread.join(PATIENCE)
    assert ran["answer"]["result"]["content"][0]["text"] == "released room", ran
    answer = read_on(bastion, "labroom", token)
    assert answer["result"]["contents"][0]["text"] == "anyone on the team may read this", answer
    assert approvals(bastion).get(approval_id).status == "used"


def legacy_lab() -> Recorder:
    """The lab MCP server in 2025-11-25 only (it offers resource subscriptions then)."""
    lab = fresh_module("lab_server_subscribed", LAB)
    app = lab.server.streamable_http_app(streamable_http_path="/mcp", event_store=MemoryEvents())
    return Recorder(LegacyOnly(app))


def subscribe_on(bastion, headers: dict, uri: str = "lab://open") -> dict:
    response = bastion.http.post(
        bastion.mcp_url("labsub"),
        json={"jsonrpc": "2.0", "id": 7, "method": "resources/subscribe", "params": {"uri": uri}},
        headers=headers,
    )
    assert response.status_code == 200, response.text
    return messages(response)[-1]


def test_a_held_subscribe_is_answered_pending_and_its_approval_lets_the_retry_subscribe(unsent):
    """A subscribe held for approval is told so (code -32008, ``approval_pending``, the request
    to answer), as a held read is; approved, the retry subscribes and spends the approval.
    Before, the hold reached the client as bastion's internal error (-32603)."""
    bastion = unsent.bastion
    port = unsent.sub_sock.getsockname()[1]
    app = legacy_lab()
    with serve(app, socket.create_server(("127.0.0.1", port))):
        headers = legacy_session(bastion, bastion.token("sam", "labsub"), "labsub")
        held = subscribe_on(bastion, headers)["error"]
        assert (held["code"], held["data"]["reason"]) == (-32008, "approval_pending"), held
        assert app.count("resources/subscribe", uri="lab://open") == 0
        approval_id = held["data"]["approval_id"]
        approvals(bastion).answer(approval_id, "sam", "approve", channel="api")
        assert subscribe_on(bastion, headers) == {"jsonrpc": "2.0", "id": 7, "result": {}}
        assert app.count("resources/subscribe", uri="lab://open") == 1
    assert approvals(bastion).get(approval_id).status == "used"


def test_an_approval_whose_subscribe_found_its_upstream_gone_is_not_spent(unsent):
    """sam's 2025-11-25 session subscribes to a note of the lab, which waits for his confirmation;
    the upstream, there when the session opened, is gone when the confirmed subscribe comes
    back: its connection is refused, so the subscribe never left bastion. The approval is given
    back (before: spent, and the person asked again), and the retry, once the upstream is back,
    subscribes with it."""
    bastion = unsent.bastion
    token = bastion.token("sam", "labsub")
    port = unsent.sub_sock.getsockname()[1]
    first, back = legacy_lab(), legacy_lab()
    # Served on a socket of its own, closed when it ends: then its connections are refused.
    with serve(first, socket.create_server(("127.0.0.1", port))):
        headers = legacy_session(bastion, token, "labsub")
        held = subscribe_on(bastion, headers, LATER)["error"]["data"]
        assert held["reason"] == "approval_pending", held
    approvals(bastion).answer(held["approval_id"], "sam", "approve", channel="api")
    failed = subscribe_on(bastion, headers, LATER)["error"]
    assert failed["code"] == -32000 and "connect" in failed["message"], failed
    assert given_back(bastion, held["approval_id"], failed)["error"] == "ConnectionRefusedError"
    with serve(back, socket.create_server(("127.0.0.1", port))):
        assert subscribe_on(bastion, headers, LATER) == {"jsonrpc": "2.0", "id": 7, "result": {}}
        # (Sent again in a new upstream session if the first was answered 404: a new server.)
        assert back.count("resources/subscribe", uri=LATER) > 0
    assert first.count("resources/subscribe", uri=LATER) == 0
    assert approvals(bastion).get(held["approval_id"]).status == "used"


def test_an_approval_whose_user_has_not_connected_their_per_user_upstream_is_not_spent(unsent):
    """labconnect takes each user's own credentials, and sam has not connected his account to
    it: his approved read is refused before anything of it is sent (he is told where to
    connect). The approval is given back each time: the person is not asked again for a call
    that never ran."""
    bastion = unsent.bastion
    token, approval_id = approved_read(unsent, "labconnect")
    for _ in range(2):
        failed = read_on(bastion, "labconnect", token)["error"]
        assert failed["code"] == -32009 and "connect your account" in failed["message"], failed
        assert given_back(bastion, approval_id, failed)["error"] == "RpcError"


# -- a call its client cancels ----------------------------------------------------------------


def starts_of(path: Path) -> int:
    """How many times a program of labstall's (labstop's) started (each start notes a line in
    ``path``)."""
    return len(path.read_text().splitlines()) if path.exists() else 0


def given_back_on_cancel(bastion, approval_id: str) -> None:
    """The approval the cancelled read spent is approved again (waiting for it: the cancellation
    is handled after the client's request), with its event `approval.unspent` naming that
    read's decision, whose record says the client cancelled it."""
    wait_for(
        lambda: approvals(bastion).get(approval_id).status == "approved",
        "the approval of the cancelled read was given back",
    )
    kept = approvals(bastion).get(approval_id)
    assert (kept.used_by, kept.used_at, kept.running_until) == (None, None, None), kept
    (event,) = approvals(bastion).audit.events(kind="approval.unspent", request_id=approval_id)
    assert event.detail["error"] == "CancelledError", event.detail
    bastion.flush()
    record = bastion.records.get(event.detail["decision_id"])
    assert (record.method, record.result) == ("resources/read", "allow")
    assert record.reason == "cancelled by the client"


def test_an_approval_whose_call_was_cancelled_by_its_client_leaving_before_it_was_sent_is_not_spent(
    unsent,
):
    """labstall's program never answers its handshake (its timeout is 30 s), so the approved
    read of sam's 2026-07-28 client waits for it, and the client goes away (its connection
    closed) meanwhile. Nothing of the read left bastion: the approval is given back (before:
    spent, marked in progress until its bound, and the person asked again), and the retry,
    once the program is the lab, goes through with it."""
    bastion = unsent.bastion
    starts = unsent.folder / "labstall-starts"
    unsent.write_program(
        "labstall", f"#!/bin/sh\necho started >> {shlex.quote(str(starts))}\nexec sleep 60\n"
    )
    token, approval_id = approved_read(unsent, "labstall")
    before = starts_of(starts)
    body = json.dumps(modern_request(1, "resources/read", {"uri": "lab://open"})).encode()
    headers = {
        **modern_headers(token, "resources/read", "lab://open"),
        "content-length": str(len(body)),
    }
    url = urlsplit(bastion.mcp_url("labstall"))
    raw = f"POST {url.path} HTTP/1.1\r\nhost: {url.netloc}\r\n"
    raw += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    with socket.create_connection((url.hostname, url.port)) as client:
        client.sendall(raw.encode() + body)
        wait_for(lambda: starts_of(starts) > before, "the read started the program")
        assert approvals(bastion).get(approval_id).status == "used"  # spent by the read
    given_back_on_cancel(bastion, approval_id)
    unsent.write_program("labstall", LAB_PROGRAM)
    answer = read_on(bastion, "labstall", token)
    assert answer["result"]["contents"][0]["text"] == "anyone on the team may read this", answer
    assert approvals(bastion).get(approval_id).status == "used"


# Answers its handshake at its first start, then exits; at any later start it never answers it.
STALLS_ONCE_STARTED = """\
import json, sys, time
with open(sys.argv[1], "a") as starts:
    starts.write("started\\n")
with open(sys.argv[1]) as starts:
    if len(starts.read().splitlines()) > 1:
        time.sleep(60)
        sys.exit(0)
for line in sys.stdin:
    message = json.loads(line)
    if message.get("method") == "initialize":
        result = {
            "protocolVersion": "2025-11-25",
            "capabilities": {"resources": {}},
            "serverInfo": {"name": "stalls", "version": "1"},
        }
        print(json.dumps({"jsonrpc": "2.0", "id": message["id"], "result": result}), flush=True)
    elif message.get("method") == "notifications/initialized":
        sys.exit(0)
"""


def test_an_approval_whose_call_its_client_cancelled_before_it_was_sent_is_not_spent(unsent):
    """sam's 2025-11-25 session on labstop opens (its program answers that handshake, then
    exits); the approved read starts the program again, whose handshake never answers now, and
    the client cancels the read meanwhile (``notifications/cancelled``). Nothing of the read
    left bastion: the approval is given back, and the retry in the same session, once the
    program is the lab, goes through with it."""
    bastion = unsent.bastion
    starts = unsent.folder / "labstop-starts"
    unsent.write_program(
        "labstop",
        f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -c "
        f"{shlex.quote(STALLS_ONCE_STARTED)} {shlex.quote(str(starts))}\n",
    )
    token, approval_id = approved_read(unsent, "labstop")
    session = legacy_session(bastion, token, "labstop")
    assert starts_of(starts) == 1
    # Read by the gateway only once it has seen the program exit: then the read starts it again.
    stdio = bastion.app.state.gateway.upstreams["labstop"].upstream
    wait_for(lambda: not stdio._started, "bastion saw the program exit")
    read = {"jsonrpc": "2.0", "id": 21, "method": "resources/read", "params": {"uri": "lab://open"}}
    answered: dict = {}

    def send() -> None:
        answered["response"] = bastion.http.post(
            bastion.mcp_url("labstop"), json=read, headers=session, timeout=60
        )

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    wait_for(lambda: starts_of(starts) == 2, "the read started the program again")
    assert approvals(bastion).get(approval_id).status == "used"  # spent by the read
    cancel = {
        "jsonrpc": "2.0",
        "method": "notifications/cancelled",
        "params": {"requestId": 21, "reason": "the user pressed stop"},
    }
    cancelled = bastion.http.post(bastion.mcp_url("labstop"), json=cancel, headers=session)
    assert cancelled.status_code == 202, cancelled.text
    thread.join(PATIENCE)
    assert "jsonrpc" not in answered["response"].text  # a cancelled request is not answered
    given_back_on_cancel(bastion, approval_id)
    unsent.write_program("labstop", LAB_PROGRAM)
    response = bastion.http.post(bastion.mcp_url("labstop"), json=read, headers=session)
    answer = messages(response)[-1]
    assert answer["result"]["contents"][0]["text"] == "anyone on the team may read this", answer
    assert approvals(bastion).get(approval_id).status == "used"


def test_an_approved_call_its_client_cancelled_after_it_was_sent_stays_spent_and_in_progress(
    bastion,
):
    """The approved call reached its upstream, and its 2025-11-25 client cancels it there: the
    upstream may have acted, so the approval stays spent and its run marked in progress until
    its bound (a retry is told so), never given back."""
    token = bastion.token("sam", "labhttp")
    tag = f"cancelled-sent-{uuid.uuid4().hex[:8]}"
    arguments = {"tag": tag}
    held = lab_call(bastion, token, arguments)["error"]["data"]
    approval = held["approval_id"]
    approvals(bastion).answer(approval, "avery", "approve", channel="api")
    session = legacy_session(bastion, token, "labhttp")
    call = {
        "jsonrpc": "2.0",
        "id": 31,
        "method": "tools/call",
        "params": {"name": LONG_RUN, "arguments": arguments},
    }
    thread = threading.Thread(
        target=lambda: bastion.http.post(
            bastion.mcp_url("labhttp"), json=call, headers=session, timeout=60
        ),
        daemon=True,
    )
    thread.start()
    try:
        wait_for(lambda: runs(bastion, tag) == 1, "the approved run started upstream")
        cancel = {
            "jsonrpc": "2.0",
            "method": "notifications/cancelled",
            "params": {"requestId": 31, "reason": "the user pressed stop"},
        }
        cancelled = bastion.http.post(bastion.mcp_url("labhttp"), json=cancel, headers=session)
        assert cancelled.status_code == 202, cancelled.text
        thread.join(PATIENCE)
        spent = approvals(bastion).get(approval)
        assert spent.status == "used" and spent.running_until is not None, spent
        assert approvals(bastion).audit.events(kind="approval.unspent", request_id=approval) == []
        retried = lab_call(bastion, token, arguments)
        assert in_progress(retried) == (-32008, "approval_in_progress", approval), retried
    finally:
        release_run(bastion, tag)
    assert runs(bastion, tag) == 1


# -- an approved run longer than its bound ------------------------------------------------------


def test_a_retry_past_the_bound_of_an_approved_run_still_upstream_is_told_it_is_in_progress(
    unsent,
):
    """labrounds answers each request within its timeout of 1 s, but its tool asks the client
    round after round, each round a request of its own: the approved run lasts as long as its
    2025-11-25 client makes it, here past twice that timeout (the bound its approval was spent
    with). The process running it renews its mark meanwhile: a retry of the same call sent
    past that bound is told the run is in progress (before: held for a new approval, which,
    given, would have run the call again). Once the run has answered, a retry is a new call,
    held anew; the tool ran once."""
    bastion, app = unsent.bastion, unsent.rounds_app
    bound = 2 * 1.0  # twice labrounds' timeout
    arguments = {"tag": f"rounds-{uuid.uuid4().hex[:8]}"}
    first_round: list[float] = []
    asked: list[bool] = []
    # Each round lasts ``pace`` at least, from the client's previous answer (or its asking for
    # the run): nine of them outlast the bound with seconds to spare for the retry's answer,
    # which ends the wait. The client waits what is left of ``pace`` once the round trip is
    # counted, so that a busy machine's slower round trips do not add to its wait within the
    # second bastion gives each answer (before: 0.4 s after any round trip, 3.6 s in all).
    pace, answered = 0.5, [0.0]
    retried = anyio.Event()

    async def elicit(context, params):
        if getattr(params, "mode", None) == "url":  # bastion's question while the call is held
            return types.ElicitResult(action="decline")
        if not first_round:
            first_round.append(time.monotonic())
        # Done once the retry was answered (at the tenth round at most: bastion's limit).
        if not retried.is_set() and len(asked) < 9:
            with anyio.move_on_after(answered[-1] + pace - time.monotonic()):
                await retried.wait()
        done = retried.is_set() or len(asked) >= 9
        asked.append(done)
        answered.append(time.monotonic())
        return types.ElicitResult(action="accept", content={"done": done})

    async def script(client, seen):
        await attempt(client, seen, "calls", ROUNDS, arguments)
        held = seen["held"] = last_error(seen)
        approvals(bastion).answer(held["approval_id"], "sam", "approve", channel="api")
        async with anyio.create_task_group() as group:
            answered.append(time.monotonic())
            group.start_soon(attempt, client, seen, "run", ROUNDS, arguments)
            # The approval was spent before the first round: past this, past its bound.
            while "run" not in seen and not (
                first_round and time.monotonic() > first_round[0] + bound + 0.2
            ):
                await anyio.sleep(0.02)
            await attempt(client, seen, "retry", ROUNDS, arguments)
            retried.set()
        await attempt(client, seen, "after", ROUNDS, arguments)

    seen = bastion.sdk("sam", "labrounds", "legacy", script, elicitation_callback=elicit)
    approval = seen["held"]["approval_id"]
    assert seen["held"]["reason"] == "approval_pending", seen["held"]
    [run] = seen["run"]
    assert run[0] == "ok" and run[1].startswith(f"done {arguments['tag']}"), run
    [retry] = seen["retry"]
    assert retry[0] == "error", retry
    assert (retry[1], retry[2]["reason"], retry[2]["approval_id"]) == (
        -32008,
        "approval_in_progress",
        approval,
    ), retry
    [after] = seen["after"]
    assert after[0] == "error" and after[2]["reason"] == "approval_pending", after
    assert after[2]["approval_id"] != approval
    calls = [
        m["params"]
        for m in app.messages()
        if m.get("method") == "tools/call" and m["params"].get("arguments") == arguments
    ]
    assert sum(1 for params in calls if "inputResponses" not in params) == 1  # one run
    used = approvals(bastion).get(approval)
    assert (used.status, used.running_until) == ("used", None)  # its run has ended
