"""A call refused is counted under none of its rate limits (docs/gateway.md), even one refused
after the counters admitted it: an approved call whose approval another run spent meanwhile
(two retries at once, on two replicas) is refused ``approval_used`` once counted, and that
count is given back, in each process's counters and in Redis. Else the call that never ran
would take the place of the next one the person approves, refused as rate limited. Its record
says so: the limits are listed as not counted."""

from __future__ import annotations

import uuid

import pytest

from tests.conftest import require_service
from tests.gateway.streams import messages, modern_headers, modern_request
from tests.gateway.support import start

HELD = 'McpResource{"lab/lab://held"}'
# The tests' policy holds every read of lab://held for a person's approval; one an hour runs.
POLICY = f'\nrate_limit(_agent: Agent, "read", {HELD}, 1, 3600);\n'
REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture(scope="module", params=["in_process", "redis"])
def bastion(request, tmp_path_factory):
    settings = {}
    if request.param == "redis":
        require_service("Redis", "127.0.0.1", 6379)
        settings = {"redis_url": REDIS_URL, "redis_prefix": f"bastion-test-{uuid.uuid4().hex[:12]}"}
    with start(
        tmp_path_factory.mktemp("uncounted"), gateway=settings, policy_extra=POLICY
    ) as running:
        yield running


def read(bastion, token: str) -> dict:
    headers = modern_headers(token, "resources/read", "lab://held")
    body = modern_request(1, "resources/read", {"uri": "lab://held"})
    return messages(bastion.http.post(bastion.mcp_url("lab"), json=body, headers=headers))[-1]


def approved(bastion, token: str) -> None:
    """Held for sam's approval, which he gives."""
    held = read(bastion, token)["error"]["data"]
    assert held["reason"] == "approval_pending", held
    bastion.app.state.approvals.answer(held["approval_id"], "sam", "approve", channel="api")


def test_an_approved_call_refused_as_used_gives_its_count_back(bastion, monkeypatch):
    token = bastion.token("sam", "lab")
    approvals = bastion.app.state.approvals
    approved(bastion, token)
    # Another replica's retry of the same call spends the approval between this one's check
    # and its spend (the real store, the real spend: only the moment is chosen).
    check = approvals.check

    def spent_meanwhile(call, request_id=None):
        outcome = check(call, request_id)
        if outcome.state == "approved":
            assert approvals.use(outcome.request, "another replica decision")
        return outcome

    monkeypatch.setattr(approvals, "check", spent_meanwhile)
    bastion.flush()
    after = bastion.records.last_seq()
    refused = read(bastion, token)["error"]["data"]
    assert refused["reason"] == "approval_used", refused
    monkeypatch.undo()
    # The next call sam approves runs: the refused one took no place in the hour's one.
    approved(bastion, token)
    answered = read(bastion, token)
    # Let through (the lab upstream has no such resource: its own error, not a refusal).
    assert "reason" not in answered.get("error", {}).get("data", {}), answered
    bastion.flush()
    [record] = [r for _, r in bastion.records.after(after) if r.id == refused["decision_id"]]
    assert (record.result, record.reason) == ("deny", "approval_used")
    assert record.obligations["rate_limits"] == [], record.obligations
    assert [limit["max"] for limit in record.obligations["rate_limits_not_counted"]] == [1]
