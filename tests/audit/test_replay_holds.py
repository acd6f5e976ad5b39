"""``bastion audit replay`` of the decisions that hold a call for a person: whether a call needs
a person's approval is the policy's to say (``requires_approval``), so a record the gateway held
for one, or refused for want of one where it holds nothing (a listen filter's resource, a
notification), is replayed and reported as an allow or a deny is. What a person then answered
is not the policy's: a call let through by an approval given afterwards is not replayed, and is
counted as such. Records are written by a real gateway from real MCP calls."""

from __future__ import annotations

import json

import pytest

from bastion.audit.decisions import DecisionRecords
from bastion.cli import main
from bastion.db import Database
from tests.gateway import support
from tests.gateway.streams import events, messages, modern_headers, modern_request

# The tests' policy holds every read of lab://held for a person's approval (support.test_policy).
HOLD_RULE = 'requires_approval(_user: User, "read", _r: McpResource) if context.uri = "lab://held";'
HELD = 'McpResource{"lab/lab://held"}'


def _read(gw, token: str) -> dict:
    headers = modern_headers(token, "resources/read", "lab://held")
    body = modern_request(1, "resources/read", {"uri": "lab://held"})
    return messages(gw.http.post(gw.mcp_url("lab"), json=body, headers=headers))[-1]


def _listen(gw, token: str) -> list[str]:
    """The resources a listen filter naming lab://held is granted (none: it needs an approval,
    which a stream cannot wait for)."""
    wanted = {"resourceSubscriptions": ["lab://held"]}
    body = modern_request("watch", "subscriptions/listen", {"notifications": wanted})
    headers = modern_headers(token, "subscriptions/listen")
    with gw.http.stream("POST", gw.mcp_url("lab"), json=body, headers=headers) as response:
        assert response.status_code == 200
        ack = next(events(response))
    return ack["params"]["notifications"].get("resourceSubscriptions", [])


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    with support.start(tmp_path_factory.mktemp("replay-holds")) as running:
        token = running.token("sam", "lab")
        # Held for sam's approval (nobody answers at once), then approved by sam and read.
        held = _read(running, token)
        assert held["error"]["data"]["reason"] == "approval_pending", held
        approvals = running.app.state.approvals
        approvals.answer(held["error"]["data"]["approval_id"], "sam", "approve", channel="api")
        # Let through (the lab upstream has no such resource: its own error, not a refusal).
        answered = _read(running, token)
        assert "reason" not in answered.get("error", {}).get("data", {}), answered
        # A listen filter is granted no resource that needs a person's approval: refused.
        assert _listen(running, token) == []
        running.flush()
        yield running


def _records(gw) -> dict[tuple[str, str], object]:
    db = Database(gw.app.state.config.database)
    try:
        found = [r for _, r in DecisionRecords(db).after(0, limit=100_000) if r.target == HELD]
    finally:
        db.close()
    by_outcome = {(r.result, r.reason): r for r in found}
    assert len(by_outcome) == len(found) == 3, [(r.result, r.reason, r.method) for r in found]
    return by_outcome


def replayed(capsys, gw, policy: str, tmp_path) -> tuple[int, dict]:
    """`bastion audit replay --json` of ``gw``'s records under ``policy``: its exit code and report."""
    path = tmp_path / "candidate.polar"
    path.write_text(policy)
    database = gw.app.state.config.database
    code = main(["audit", "replay", "--policy", str(path), "--database", database, "--json"])
    out = capsys.readouterr()
    assert code in (0, 1), out.err
    return code, json.loads(out.out)


def test_a_hold_the_policy_decided_is_replayed_and_the_policy_in_force_agrees(
    gateway, tmp_path, capsys
):
    records = _records(gateway)
    assert set(records) == {
        ("held", "approval_pending"),
        ("allow", "upstream error -32602"),  # the approved read (lab has no such resource)
        ("deny", "requires_approval"),  # the listen filter's
    }
    code, report = replayed(capsys, gateway, support.test_policy(), tmp_path)
    assert code == 0
    assert report["changed"] == []
    assert report["replayed"] == report["same"]
    # Only the read a person's approval let through is not the policy's alone.
    assert report["not_replayable"].get("approval") == 1, report["not_replayable"]
    assert "not_decided_by_policy" not in report["not_replayable"], report["not_replayable"]


def test_a_candidate_without_the_hold_changes_the_held_call_and_the_refused_filter(
    gateway, tmp_path, capsys
):
    policy = support.test_policy()
    assert policy.count(HOLD_RULE) == 1
    code, report = replayed(capsys, gateway, policy.replace(HOLD_RULE, ""), tmp_path)
    assert code == 1
    records = _records(gateway)
    changed = {c["id"]: c for c in report["changed"]}
    held, refused = records[("held", "approval_pending")], records[("deny", "requires_approval")]
    assert set(changed) == {held.id, refused.id}
    assert (changed[held.id]["old"]["result"], changed[held.id]["new"]["result"]) == (
        "held",
        "allow",
    )
    assert (changed[refused.id]["old"]["result"], changed[refused.id]["new"]["result"]) == (
        "deny",
        "allow",
    )
    # The approved read: what a person answered is not replayed, whatever the candidate.
    assert report["not_replayable"].get("approval") == 1, report["not_replayable"]


def test_a_candidate_that_holds_what_the_gateway_refused_instead_agrees_with_the_refusal(
    gateway, tmp_path, capsys
):
    """A listen filter's resource is refused where the policy would hold it (nobody can wait on
    a stream): replayed by the same policy it is refused again, not reported as a hold."""
    code, report = replayed(capsys, gateway, support.test_policy(), tmp_path)
    refused = _records(gateway)[("deny", "requires_approval")]
    assert refused.id not in {c["id"] for c in report["changed"]}
    assert code == 0
