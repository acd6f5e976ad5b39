"""Held calls through the gateway with the official MCP SDK client, in both protocol eras: a
call that needs approval waits for people, goes through once approved, exactly once, and only
for the arguments that were approved; a result held for review reaches the agent only once a
reviewer releases it, without a second upstream call."""

from __future__ import annotations

import json
import time
import uuid

import pytest
from mcp import types
from mcp.shared.exceptions import MCPError

from tests.conftest import drop_redis_keys, require_service
from tests.gateway.streams import messages, modern_headers, modern_request
from tests.gateway.support import start
from tests.redis_outage import RedisRelay

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
    assert failed == ("error", -32000, None), failed  # the upstream failed
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
    deadline = time.monotonic() + 10
    while bastion.app.state.replica.applied < bastion.store.head():
        assert time.monotonic() < deadline, "the replica did not catch up"
        time.sleep(0.01)


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
    forged = states.sign("some-request", "avery", "another-agent")
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
