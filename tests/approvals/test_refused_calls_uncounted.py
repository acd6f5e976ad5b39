"""A call refused is counted under none of its rate limits (docs/gateway.md), even one refused
after the counters admitted it: an approved call whose approval another run spent meanwhile
(two retries at once, on two replicas) is refused ``approval_used`` once counted, and that
count is given back, in each process's counters and in Redis. Else the call that never ran
would take the place of the next one the person approves, refused as rate limited. Its record
says so: the limits are listed as not counted. Where Redis has gone away in between, the call
stays counted (never one call more than allowed), and the log says so once per outage."""

from __future__ import annotations

import logging
import uuid
from collections import Counter

import pytest

from tests.conftest import require_service
from tests.gateway.streams import messages, modern_headers, modern_request
from tests.gateway.support import start
from tests.private_redis import PrivateRedis

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


def test_a_call_refused_after_its_count_while_redis_is_away_stays_counted(tmp_path, caplog):
    """Redis stops between the count of an approved call and its refusal (its approval spent
    meanwhile by another run): the count cannot be given back. The client gets its refusal,
    the call stays counted (one call fewer in the window, never one more), the record lists the
    limits as applied, and the log says once that Redis is away, not once per failed step."""
    folder = tmp_path / "redis"
    folder.mkdir()
    redis = PrivateRedis(folder, appendonly=True)  # what it counted outlives a stop
    settings = {"redis_url": redis.url, "redis_prefix": "bastion-test"}
    with (
        redis,
        start(tmp_path, gateway=settings, policy_extra=POLICY) as bastion,
        pytest.MonkeyPatch.context() as patch,
    ):
        token = bastion.token("sam", "lab")
        approvals = bastion.app.state.approvals
        approved(bastion, token)
        use = approvals.use

        def spent_elsewhere_then_redis_stops(request, decision_id, runs_for=0.0):
            # Counted already: another replica's retry spends the approval, and Redis stops.
            assert use(request, "another replica decision")
            redis.stop()
            return use(request, decision_id, runs_for)

        patch.setattr(approvals, "use", spent_elsewhere_then_redis_stops)
        bastion.flush()
        after = bastion.records.last_seq()
        refused = read(bastion, token)["error"]
        patch.undo()
        assert refused["code"] == -32003, refused
        assert refused["data"]["reason"] == "approval_used", refused
        # While Redis is away, limited calls are refused as they cannot be counted (the
        # approval, never spent, lets each retry through to its rate limit).
        approved(bastion, token)
        for _ in range(3):
            unavailable = read(bastion, token)["error"]
            assert unavailable["data"]["reason"] == "rate_limit_unavailable", unavailable
        # Redis away is said once by each store on it (not once per call or per step).
        said = Counter(
            r.name
            for r in caplog.records
            if r.levelno >= logging.WARNING and "Redis at" in r.getMessage()
        )
        assert said["bastion.gateway.ratelimit"] == 1, caplog.text
        assert set(said.values()) == {1}, caplog.text
        bastion.flush()
        [record] = [
            r for _, r in bastion.records.after(after) if r.id == refused["data"]["decision_id"]
        ]
        assert (record.result, record.reason) == ("deny", "approval_used")
        assert [limit["max"] for limit in record.obligations["rate_limits"]] == [1]
        assert not record.obligations.get("rate_limits_not_counted"), record.obligations
        # Back with what it held: the refused call is still in its window, so the last one,
        # approved, is refused as rate limited (one call fewer this hour, never one more).
        redis.start()
        [key] = redis.client().keys("bastion-test:ratelimit:*")
        assert redis.client().zscore(key, refused["data"]["decision_id"]) is not None
        limited = read(bastion, token)["error"]
        assert limited["data"]["reason"] == "rate_limited", limited
        again = [r.getMessage() for r in caplog.records if "answers again" in r.getMessage()]
        assert any(m.startswith("rate limits: Redis at") for m in again), caplog.text
