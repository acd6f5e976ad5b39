"""A held call only its user could confirm, under ``self_approval_forbidden`` with no approver rule
naming anyone else, through the real gateway: nobody could ever answer it, so it is refused at
once (``no_approver``, a message saying self-approval is forbidden and no approver rule names
anyone else) and recorded, in both MCP eras; a result held for review so is refused before the
call runs. Approver rules over the evaluation budget refuse it (``evaluation_limit``) rather
than hold it for nobody. A call with an approver named other than its user is held as before."""

from __future__ import annotations

import pytest

from bastion.audit.replay import NotReplayable, question_of
from tests.approvals.test_agents_acting_as_themselves import call, recorded
from tests.signals.support import running

TOOL = 'Tool{"deskhttp/search_customers"}'
RULES = f"""
requires_approval(_user: User, "call", {TOOL}) if context.arguments.query in ["held", "named"];
requires_review(_user: User, "call", {TOOL}) if context.arguments.query = "reviewed";
self_approval_forbidden(_user: User, "call", {TOOL});
approver(User{{"avery"}}, _user: User, "call", {TOOL}) if context.arguments.query = "named";
# A rule that never ends: asking who approves "spun" spends the evaluation budget.
spin(n: Integer) if m = n + 1 and spin(m);
requires_approval(_user: User, "call", {TOOL}) if context.arguments.query = "spun";
approver(User{{"avery"}}, _user: User, "call", {TOOL}) if
  context.arguments.query = "spun" and spin(0);
"""


@pytest.fixture(scope="module")
def bastion(tmp_path_factory):
    yield from running(tmp_path_factory, "self-forbidden", RULES)


def pending(bastion) -> int:
    return len(bastion.app.state.approvals.listed(status="pending", limit=200))


@pytest.mark.parametrize("era", ["legacy", "modern"])
def test_a_call_nobody_but_its_user_could_confirm_is_refused_at_once_and_recorded(bastion, era):
    before = pending(bastion)
    refused = call(bastion, bastion.token("sam", "deskhttp"), {"query": "held"}, era)
    error = refused["error"]
    assert (error["code"], error["data"]["reason"]) == (-32003, "no_approver"), refused
    assert "approval_id" not in error["data"]
    assert "self-approval" in error["message"] and "approver rule" in error["message"]
    record = recorded(bastion, error["data"]["decision_id"])
    assert (record.result, record.reason) == ("deny", "no_approver")
    assert pending(bastion) == before


def test_a_result_nobody_but_its_user_could_review_is_refused_before_the_call_runs(bastion):
    before = bastion.recorder.count("tools/call", name="search_customers")
    refused = call(bastion, bastion.token("sam", "deskhttp"), {"query": "reviewed"})
    assert refused["error"]["data"]["reason"] == "no_approver", refused
    assert "self-approval" in refused["error"]["message"]
    assert bastion.recorder.count("tools/call", name="search_customers") == before
    record = recorded(bastion, refused["error"]["data"]["decision_id"])
    assert (record.result, record.reason) == ("deny", "no_approver")
    assert record.obligations["approval"] == {"kind": "review"}


def test_approver_rules_over_the_evaluation_budget_refuse_the_call_at_once(bastion):
    before = pending(bastion)
    refused = call(bastion, bastion.token("sam", "deskhttp"), {"query": "spun"})
    error = refused["error"]
    assert error["data"]["reason"] == "evaluation_limit", refused
    assert "approver rules" in error["message"] and "budget" in error["message"]
    record = recorded(bastion, error["data"]["decision_id"])
    assert (record.result, record.reason) == ("deny", "evaluation_limit")
    assert pending(bastion) == before
    # The hold's refusal, not the decision's: a replay does not take it for the policy's.
    assert record.obligations["approval"] == {"kind": "approval"}
    with pytest.raises(NotReplayable) as unreplayed:
        question_of(record)
    assert unreplayed.value.reason == "approval"


def test_a_call_with_an_approver_named_other_than_its_user_is_still_held(bastion):
    held = call(bastion, bastion.token("sam", "deskhttp"), {"query": "named"})["error"]["data"]
    assert held["reason"] == "approval_pending", held
    request = bastion.app.state.approvals.get(held["approval_id"])
    assert request.approvers == ("avery",) and request.self_forbidden
