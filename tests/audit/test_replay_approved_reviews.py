"""``bastion audit replay`` of a call held for approval whose result is held for review: the
approval hold is the policy's, but the review that holds the result of the run a person's
approval let through is there because that person approved (and stays, whatever the policy
says of reviews now: docs/approvals.md). Its records say which approval the run used, and are
not replayed as the policy's. Records are written by a real gateway from real MCP calls."""

from __future__ import annotations

import pytest

from bastion.audit.decisions import DecisionRecords
from bastion.db import Database
from tests.audit.test_replay_holds import replayed
from tests.gateway import support
from tests.gateway.streams import messages, modern_headers, modern_request

# sam's reads of lab://open wait for his approval, and their results for his review.
HOLDS = """
requires_approval(_user: User, "read", _r: McpResource) if
  context.server = "lab" and context.uri = "lab://open";
requires_review(_user: User, "read", _r: McpResource) if
  context.server = "lab" and context.uri = "lab://open";
"""
OPEN = 'McpResource{"lab/lab://open"}'


def _read(gw, token: str) -> dict:
    headers = modern_headers(token, "resources/read", "lab://open")
    body = modern_request(1, "resources/read", {"uri": "lab://open"})
    return messages(gw.http.post(gw.mcp_url("lab"), json=body, headers=headers))[-1]


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    with support.start(
        tmp_path_factory.mktemp("replay-approved-reviews"), policy_extra=HOLDS
    ) as running:
        token = running.token("sam", "lab")
        held = _read(running, token)["error"]["data"]
        assert held["reason"] == "approval_pending", held
        approvals = running.app.state.approvals
        approvals.answer(held["approval_id"], "sam", "approve", channel="api")
        # Approved: the read runs once, and its result waits for a review.
        reviewed = _read(running, token)["error"]["data"]
        assert reviewed["reason"] == "review_pending", reviewed
        # The retry is pointed at that review, the read not run again.
        again = _read(running, token)["error"]["data"]
        assert (again["reason"], again["approval_id"]) == (
            "review_pending",
            reviewed["approval_id"],
        )
        running.flush()
        running.ids = (held["approval_id"], reviewed["approval_id"])
        yield running


def _records(gw) -> list:
    db = Database(gw.app.state.config.database)
    try:
        return [r for _, r in DecisionRecords(db).after(0, limit=100_000) if r.target == OPEN]
    finally:
        db.close()


def test_a_review_of_an_approved_run_names_the_approval_it_ran_with(gateway):
    approval, review = gateway.ids
    outcomes = [(r.result, r.reason, r.obligations.get("approval")) for r in _records(gateway)]
    assert outcomes == [
        ("held", "approval_pending", {"id": approval, "kind": "approval"}),
        ("held", "review_pending", {"id": review, "kind": "review", "approval_id": approval}),
        ("held", "review_pending", {"id": review, "kind": "review", "approval_id": approval}),
    ]


def test_a_review_of_an_approved_run_is_not_replayed_as_the_policys(gateway, tmp_path, capsys):
    """A candidate without either hold changes the approval hold (the policy's), and leaves the
    reviews of the approved run alone: they are the approver's doing."""
    policy = support.test_policy() + HOLDS
    _, same = replayed(capsys, gateway, policy, tmp_path)
    assert same["changed"] == []
    assert same["not_replayable"].get("approval") == 2, same["not_replayable"]
    _, report = replayed(capsys, gateway, support.test_policy(), tmp_path)
    [first] = [r for r in _records(gateway) if r.reason == "approval_pending"]
    assert [c["id"] for c in report["changed"]] == [first.id]
    assert report["not_replayable"].get("approval") == 2, report["not_replayable"]
