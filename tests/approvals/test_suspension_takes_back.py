"""A suspension takes back what was approved before it, on a real SQLite file and a real
PostgreSQL schema: a held call's approval, an approval for minutes and a released result of the
suspended user or agent, or given by the suspended approver, are closed when the suspension is
stored, whichever way it is written. Lifted (or lapsed), the suspension brings none of them back:
the call is held again and the people are asked again. Before, each was used after the resume."""

# ruff: noqa: F401, F811 (`world` and `people` are fixtures, imported for the tests to take)
from __future__ import annotations

import dataclasses

import pytest

from bastion.facts.model import Entity
from bastion.facts.store import StoredFact
from bastion.signals.suspensions import apply_facts, resume, suspend, suspension
from tests.approvals.test_agents_acting_as_themselves import call as call_tool
from tests.approvals.test_service import (
    acting_as_itself,
    call,
    delete,
    held,
    people,
    report,
    reviewed,
    send,
    world,
)
from tests.approvals.test_unanswerable import RULES, approver
from tests.signals.support import running

GRANTS = ("approval_grant", None, None, None, None)


def suspended_and_resumed(facts, kind: str, id: str) -> None:
    """The kill switch on, then off again, as the API and the command line write it."""
    suspend(facts, suspension(kind, id), "test")
    assert resume(facts, suspension(kind, id), "test").deleted == 1


def voided(approvals, request_id: str) -> dict:
    """The request's status, and the detail of its ``*.void`` audit event."""
    request = approvals.store.get(request_id)
    (event,) = approvals.audit.events(f"{request.kind}.void", request_id=request_id)
    return {"status": approvals.store.get(request_id).status, **event.detail}


def test_an_approval_given_before_its_agent_was_suspended_is_not_used_after_the_resume(world):
    approvals, _, facts, _ = world
    request = held(approvals, call(send))
    approvals.answer(request.id, "avery", "approve", channel="api")
    assert approvals.check(call(send)).state == "approved"
    suspended_and_resumed(facts, "agent", "bot")
    outcome = approvals.check(call(send))
    assert outcome.state == "hold", outcome
    detail = voided(approvals, request.id)
    assert (detail["status"], detail["reason"], detail["was"]) == ("void", "suspended", "approved")
    assert detail["suspended"] == repr(Entity("Agent", "bot"))
    # Held again, the call asks the people again.
    assert held(approvals, call(send)).id != request.id


def test_an_approval_for_minutes_is_taken_back_by_its_users_suspension(world):
    approvals, _, facts, _ = world
    request = held(approvals, call(send))
    approvals.answer(request.id, "avery", "approve", minutes=15, channel="api")
    assert len(facts.get(GRANTS)) == 1
    # Another user's approval is not theirs to lose.
    other = held(approvals, call(delete, subject="lee"))
    approvals.answer(other.id, "lee", "approve", minutes=0, channel="api")
    suspended_and_resumed(facts, "user", "sam")
    assert facts.get(GRANTS) == []
    assert approvals.check(call(send)).state == "hold"
    assert approvals.check(call(delete, subject="lee")).state == "approved"


def test_what_a_suspended_approver_approved_is_taken_back_and_no_one_elses(world):
    approvals, _, facts, _ = world
    request = held(approvals, call(send))
    approvals.answer(request.id, "avery", "approve", minutes=15, channel="api")
    confirmed = held(approvals, call(delete))
    approvals.answer(confirmed.id, "sam", "approve", channel="api")
    suspended_and_resumed(facts, "user", "avery")
    assert approvals.check(call(send)).state == "hold"
    assert facts.get(GRANTS) == []
    assert voided(approvals, request.id)["suspended"] == repr(Entity("User", "avery"))
    assert approvals.check(call(delete)).state == "approved"  # sam confirmed it: not avery's


def test_a_result_released_before_its_agent_was_suspended_is_not_delivered_after(world):
    approvals, _, facts, _ = world
    review = reviewed(approvals, report, {"customers": []})
    approvals.answer(review.id, "sam", "approve", channel="api")
    reviewing = dataclasses.replace(call(report), kind="review")
    assert approvals.check(reviewing).state == "released"
    suspended_and_resumed(facts, "agent", "bot")
    assert approvals.check(reviewing).state != "released"
    assert approvals.held_result(approvals.store.get(review.id)) is None
    assert voided(approvals, review.id)["was"] == "released"


def test_an_agent_acting_as_itself_loses_its_approval_to_its_owners_suspension(people):
    approvals, _, facts, _ = people  # pat owns nightly
    request = held(approvals, acting_as_itself(delete))
    assert request.confirmer == "pat"
    approvals.answer(request.id, "pat", "approve", channel="api")
    suspended_and_resumed(facts, "user", "pat")
    assert approvals.check(acting_as_itself(delete)).state == "hold"


def test_a_suspension_written_as_a_fact_takes_back_as_much(world):
    """Through the fact APIs (``/v1/facts``, Oso Cloud's, ``bastion facts``), with the kill
    switch's scope: the same approvals are closed in the same transaction."""
    approvals, _, facts, _ = world
    request = held(approvals, call(send))
    approvals.answer(request.id, "avery", "approve", channel="api")
    fact = ("suspended", Entity("Agent", "bot"))
    apply_facts(facts, [StoredFact(fact)], [], "test")
    facts.apply([], [fact], actor="test")
    assert approvals.check(call(send)).state == "hold"


# -- through the real gateway and /v1/suspensions ---------------------------------------------


@pytest.fixture(scope="module")
def bastion(tmp_path_factory):
    yield from running(tmp_path_factory, "suspension-takes-back", RULES)


def kill_switch(bastion, method: str, path: str, **body) -> None:
    key, _ = bastion.app.state.keys.create("kill switch", ["suspensions"], created_by="t")
    answer = bastion.http.request(
        method,
        f"{bastion.url}{path}",
        json=body or None,
        headers={"authorization": f"Bearer {key}"},
    )
    assert answer.status_code in (200, 201), answer.text


def test_a_call_approved_before_its_agent_was_suspended_is_held_again_after_the_resume(bastion):
    """sam's search, approved by casey, waits for its retry; the agent is suspended through the
    API, then resumed. The retry is held for a new approval, not run on the old one."""
    name, query = "casey", "held-before-suspension"
    approver(bastion, name, query)
    token = bastion.token("sam", "deskhttp")
    data = call_tool(bastion, token, {"query": query})["error"]["data"]
    assert data["reason"] == "approval_pending", data
    approvals = bastion.app.state.approvals
    approvals.answer(data["approval_id"], name, "approve", channel="api")
    agent = approvals.store.get(data["approval_id"]).client_id
    kill_switch(bastion, "POST", "/v1/suspensions", kind="agent", id=agent)
    kill_switch(bastion, "DELETE", f"/v1/suspensions/agent/{agent}")
    retried = call_tool(bastion, token, {"query": query})
    assert retried["error"]["data"]["reason"] == "approval_pending", retried
    assert retried["error"]["data"]["approval_id"] != data["approval_id"]
    assert approvals.store.get(data["approval_id"]).status == "void"
