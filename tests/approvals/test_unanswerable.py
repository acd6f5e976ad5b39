"""A held call whose only approver is named by a fact, through the real gateway, in both MCP
eras: the fact is deleted while the call waits, so nobody may answer its request any more. Its
retry closes the request (``expired``, an audit event saying ``no_approver``) and is refused
``no_approver`` with the same meaning as a call refused at once; a client waiting for people
(``wait_seconds``) is refused so without waiting out the wait. Before, the request stayed pending
for nobody until it expired (the retry was told ``approval_pending``). With the approver still
named, the call stays pending."""

from __future__ import annotations

import threading
import time

import pytest

from bastion.facts.model import Entity
from bastion.oauth.users import create_user
from bastion.signals.suspensions import suspend, suspension
from tests.approvals.test_agents_acting_as_themselves import call, recorded
from tests.signals.support import running
from tests.waits import eventually

TOOL = 'Tool{"deskhttp/search_customers"}'
# The user may never approve their own search; whoever signs for its query may.
RULES = f"""
declare signs_for(User, String);
requires_approval(_user: User, "call", {TOOL}) if
  starts_with(context.arguments.query, "held");
self_approval_forbidden(_user: User, "call", {TOOL});
approver(boss: User, _user: User, "call", {TOOL}) if signs_for(boss, context.arguments.query);
"""


@pytest.fixture(scope="module")
def bastion(tmp_path_factory):
    yield from running(tmp_path_factory, "unanswerable", RULES)


@pytest.fixture(scope="module")
def waiting(tmp_path_factory):
    """A bastion whose held requests wait for people (within the test client's timeout)."""
    yield from running(
        tmp_path_factory, "unanswerable-waiting", RULES, approvals={"wait_seconds": 15}
    )


def signer(query: str) -> tuple:
    return ("signs_for", Entity("User", "avery"), query)


def held(bastion, query: str, era: str = "modern") -> tuple[dict, str]:
    """sam's search for ``query``, held for avery: the pending error's data, and the token
    (of one agent: the retry is the same call)."""
    bastion.apply([signer(query)])
    token = bastion.token("sam", "deskhttp")
    answer = call(bastion, token, {"query": query}, era)
    data = answer["error"]["data"]
    assert data["reason"] == "approval_pending", answer
    assert bastion.app.state.approvals.store.get(data["approval_id"]).approvers == ("avery",)
    return data, token


@pytest.mark.parametrize("era", ["legacy", "modern"])
def test_a_retry_whose_request_nobody_may_answer_any_more_is_refused_no_approver(bastion, era):
    query = f"held-gone-{era}"
    data, token = held(bastion, query, era)
    bastion.apply(deletes=[signer(query)])
    refused = call(bastion, token, {"query": query}, era)
    error = refused["error"]
    assert (error["code"], error["data"]["reason"]) == (-32003, "no_approver"), refused
    assert error["data"]["approval_id"] == data["approval_id"]
    assert "self-approval" in error["message"] and "approver rule" in error["message"]
    record = recorded(bastion, error["data"]["decision_id"])
    assert (record.result, record.reason) == ("deny", "no_approver")
    approvals = bastion.app.state.approvals
    assert approvals.store.get(data["approval_id"]).status == "expired"
    (closed,) = approvals.audit.events("approval.expired", request_id=data["approval_id"])
    assert closed.detail["reason"] == "no_approver"
    # Sent again, it is refused at once, as any call nobody could answer: nothing is held.
    again = call(bastion, token, {"query": query}, era)
    assert again["error"]["data"]["reason"] == "no_approver", again
    assert "approval_id" not in again["error"]["data"]


@pytest.mark.parametrize("era", ["legacy", "modern"])
def test_a_retry_whose_approver_is_still_named_is_still_pending(bastion, era):
    query = f"held-kept-{era}"
    data, token = held(bastion, query, era)
    retried = call(bastion, token, {"query": query}, era)
    assert retried["error"]["data"]["reason"] == "approval_pending", retried
    assert retried["error"]["data"]["approval_id"] == data["approval_id"]
    assert bastion.app.state.approvals.get(data["approval_id"]).status == "pending"


def test_a_request_nobody_may_answer_any_more_is_closed_when_the_api_shows_it(bastion):
    data, _ = held(bastion, "held-shown")
    bastion.apply(deletes=[signer("held-shown")])
    key, _ = bastion.app.state.keys.create("approvals viewer", ["approvals"], created_by="t")
    shown = bastion.http.get(
        f"{bastion.url}/v1/approvals/{data['approval_id']}",
        headers={"authorization": f"Bearer {key}"},
    )
    assert shown.status_code == 200, shown.text
    assert shown.json()["status"] == "expired"


def test_a_waiting_call_whose_request_nobody_may_answer_any_more_is_refused(waiting):
    """The client waits for people (``wait_seconds``); the approver's fact is deleted meanwhile:
    the wait ends, and the call is refused ``no_approver`` (before: ``approval_pending`` once
    the wait ran out)."""
    query = "held-while-waiting"
    waiting.apply([signer(query)])
    token = waiting.token("sam", "deskhttp")
    answers: list[dict] = []
    calling = threading.Thread(
        target=lambda: answers.append(call(waiting, token, {"query": query}, "legacy"))
    )
    calling.start()
    approvals = waiting.app.state.approvals
    found: list = []
    while not found and calling.is_alive():
        found = [r for r in approvals.listed(status="pending") if r.arguments == {"query": query}]
        calling.join(0.05)
    assert found, answers
    waiting.apply(deletes=[signer(query)])
    calling.join()
    error = answers[0]["error"]
    assert error["data"]["reason"] == "no_approver", answers
    assert error["data"]["approval_id"] == found[0].id
    assert approvals.store.get(found[0].id).status == "expired"


def approver(bastion, name: str, query: str) -> None:
    """``name``, a bastion user, signs for ``query``: its only approver."""
    create_user(bastion.app.state.oauth.store, name, "approver-password", time.time(), actor="t")
    bastion.apply([("signs_for", Entity("User", name), query)])


@pytest.mark.parametrize("era", ["legacy", "modern"])
def test_a_call_held_only_for_a_disabled_approver_is_refused_no_approver_at_once(bastion, era):
    """Its only approver is disabled (`bastion users disable`): they answer nothing, so held it
    would wait for nobody until it expired (before: ``approval_pending``). Refused at once,
    saying why without naming them, and recorded; nothing is held."""
    name, query = f"blair-{era}", f"held-disabled-{era}"
    approver(bastion, name, query)
    bastion.app.state.oauth.store.disable_user(name, time.time(), actor="test")
    before = len(bastion.app.state.approvals.listed(status="pending", limit=200))
    refused = call(bastion, bastion.token("sam", "deskhttp"), {"query": query}, era)
    error = refused["error"]
    assert (error["code"], error["data"]["reason"]) == (-32003, "no_approver"), refused
    assert "disabled" in error["message"] and name not in error["message"]
    assert "approval_id" not in error["data"]
    record = recorded(bastion, error["data"]["decision_id"])
    assert (record.result, record.reason) == ("deny", "no_approver")
    assert len(bastion.app.state.approvals.listed(status="pending", limit=200)) == before


def test_a_retry_whose_only_approver_was_suspended_meanwhile_is_refused_no_approver(bastion):
    """The kill switch holds the only approver while the call waits: its retry closes the
    request and is refused ``no_approver`` (before: ``approval_pending`` until it expired)."""
    name, query = "casey", "held-suspended"
    approver(bastion, name, query)
    token = bastion.token("sam", "deskhttp")
    data = call(bastion, token, {"query": query})["error"]["data"]
    assert data["reason"] == "approval_pending", data
    seq = suspend(bastion.store, suspension("user", name), "test").seq
    applied = eventually(lambda: bastion.app.state.replica.applied >= seq, every=0.01)
    assert applied, "the replica did not apply the suspension"
    refused = call(bastion, token, {"query": query})
    error = refused["error"]
    assert error["data"]["reason"] == "no_approver", refused
    assert error["data"]["approval_id"] == data["approval_id"]
    assert "suspended" in error["message"] and name not in error["message"]
    assert bastion.app.state.approvals.store.get(data["approval_id"]).status == "expired"
