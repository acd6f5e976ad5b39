"""`bastion audit replay` asks a token exchange's record again as the token endpoint asked it:
``may_delegate`` of the current agent to the sub-agent on the MCP server, and
``delegated_scope`` of each scope asked for, for the recorded chain, with the recorded context,
on the facts stored now (`bastion.decide.contract.decide_exchange`, the endpoint's own
question). Would the policy today still let this agent act for this user, with these scopes? A
refusal now, or fewer (or more) scopes passing, is a change; the same answer is not listed. A
refusal made before the policy was asked is not replayed, and says why."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest

from bastion.audit.replay import NotReplayable, question_of
from tests.command_line import bastion_in_process

from .support import POLICY
from .test_exchange_records import exchange_records
from .test_exchange_rules import cast, error, reissue

# The example policy's may_delegate asks the sub-agent to be an illustrator; a candidate that
# lets coders delegate to publishers only refuses every exchange the tests below make.
ILLUSTRATOR = 'has_role(to, "illustrator", server);'
# The example policy lets writes pass while the device is compliant; a candidate without that
# rule lets only reads through.
WRITES_PASS = 'scope in ["svg:write", "files:write"] and'


def candidate(tmp_path, old: str, new: str) -> str:
    """examples/delegation.polar with ``old`` (which it holds once) made ``new``."""
    text = POLICY.read_text(encoding="utf-8")
    assert text.count(old) == 1
    path = tmp_path / "candidate.polar"
    path.write_text(text.replace(old, new), encoding="utf-8")
    return str(path)


def replay(studio, policy: str) -> tuple[int, dict]:
    """``bastion audit replay --policy <policy> --json`` on the studio's database: its exit
    status and report."""
    done = bastion_in_process(
        "audit", "replay", "--policy", policy, "--json", "--config", str(studio.config),
        env=os.environ,
    )  # fmt: skip
    assert done.returncode in (0, 1), done.stderr
    return done.returncode, json.loads(done.stdout)


def listed(report: dict, record) -> dict | None:
    found = [c for c in report["changed"] if c["id"] == record.id]
    return found[0] if found else None


def allowed(studio, name: str, scope: str):
    """A coding agent and its illustrator; the exchange for ``scope``, allowed; its record."""
    coder, sub = cast(studio, name)
    subject = studio.user_token(coder, "sam")["access_token"]
    answer = studio.exchange(coder, subject, studio.own_token(sub), scope=scope)
    assert answer.status_code == 200, answer.text
    [record] = exchange_records(studio, sub.client_id, 1)
    return record


def test_an_exchange_the_candidate_refuses_is_a_change_the_push_makes(studio, tmp_path):
    record = allowed(studio, "replay-refused", "files:read svg:write")
    coder, stranger = cast(studio, "replay-stranger", sub_roles=())
    subject = studio.user_token(coder, "sam")["access_token"]
    assert error(studio.exchange(coder, subject, studio.own_token(stranger))) == (
        400,
        "invalid_request",
    )
    [refused] = exchange_records(studio, stranger.client_id, 1)
    assert (refused.result, refused.reason) == ("deny", "not_permitted")

    status, report = replay(
        studio, candidate(tmp_path, ILLUSTRATOR, 'has_role(to, "publisher", server);')
    )
    assert status == 1
    change = listed(report, record)
    assert change is not None, report
    assert (change["method"], change["action"]) == ("token/exchange", "delegate")
    assert change["old"]["result"] == "allow"
    assert change["old"]["scopes"] == ["files:read", "svg:write"]
    assert (change["new"]["result"], change["new"]["reason"]) == ("deny", "not_permitted")
    assert change["new"]["scopes"] == []
    assert change["in_force"]["result"] == "allow"
    assert change["in_force"]["scopes"] == ["files:read", "svg:write"]
    assert (change["changed_by_push"], change["cause"]) == (True, "policy")
    # Refused then, refused by the candidate and by the policy in force: not listed.
    assert listed(report, refused) is None


def test_fewer_scopes_passing_is_a_change_and_the_same_scopes_are_not(studio, tmp_path):
    both = allowed(studio, "replay-narrowed", "files:read svg:write")
    reads = allowed(studio, "replay-reads", "files:read")

    status, report = replay(studio, candidate(tmp_path, WRITES_PASS, "scope in [] and"))
    assert status == 1
    change = listed(report, both)
    assert change is not None, report
    assert (change["old"]["result"], change["new"]["result"]) == ("allow", "allow")
    assert change["old"]["scopes"] == ["files:read", "svg:write"]
    assert change["new"]["scopes"] == ["files:read"]
    assert any(rule.startswith("delegated_scope") for rule in change["new"]["rules"])
    assert (change["changed_by_push"], change["cause"]) == (True, "policy")
    # Reads alone were asked and granted: the candidate grants them still.
    assert listed(report, reads) is None


def test_scopes_the_facts_hold_back_today_are_the_facts_doing_not_the_push(studio):
    record = allowed(studio, "replay-facts", "files:read svg:write")
    studio.signal("sam", "device_compliant", False)
    try:
        # The policy in force as the candidate: the push changes nothing.
        status, report = replay(studio, str(POLICY))
    finally:
        studio.signal("sam", "device_compliant", True)
    assert status == 0
    change = listed(report, record)
    assert change is not None, report
    assert change["new"]["scopes"] == ["files:read"]
    assert (change["changed_by_push"], change["cause"]) == (False, "facts")
    assert change["policy_of_the_time"]["scopes"] == ["files:read"]
    assert report["not_replayable"].get("token_exchange") is None


def test_an_exchange_refused_before_the_policy_is_not_replayed_and_says_why(studio):
    coder, sub = cast(studio, "replay-early")
    subject = studio.user_token(coder, "sam")["access_token"]
    someone_else = reissue(studio, subject, may_act={"sub": "someone-else"})
    assert error(studio.exchange(coder, someone_else, studio.own_token(sub)))[0] == 400
    [record] = exchange_records(studio, sub.client_id, 1)
    with pytest.raises(NotReplayable) as skipped:
        question_of(record)
    assert skipped.value.reason == "exchange_refused_before_policy"
    assert record.reason in str(skipped.value)  # what the client was told: the may_act claim
    _, report = replay(studio, str(POLICY))
    assert report["not_replayable"]["exchange_refused_before_policy"] >= 1
    assert listed(report, record) is None


def test_an_exchange_refused_after_the_policy_by_something_else_is_not_replayed(studio):
    record = allowed(studio, "replay-suspended", "files:read")
    # The kill switch (or a revoked grant, a task) refused it once the policy let it through:
    # not the policy's answer, so not the policy's to give again.
    suspended = dataclasses.replace(record, result="deny", reason="suspended")
    with pytest.raises(NotReplayable) as skipped:
        question_of(suspended)
    assert skipped.value.reason == "not_decided_by_policy"
    # A record that does not say which scopes were asked for, or which passed, is not guessed.
    asked = {k: v for k, v in record.context.items() if k != "requested_scopes"}
    for incomplete in (
        dataclasses.replace(record, context=asked),
        dataclasses.replace(record, obligations={}),
    ):
        with pytest.raises(NotReplayable) as skipped:
            question_of(incomplete)
        assert skipped.value.reason == "exchange_not_recorded"


def test_the_text_report_says_the_scopes_granted_then_and_now(studio, tmp_path):
    record = allowed(studio, "replay-text", "files:read svg:write")
    done = bastion_in_process(
        "audit", "replay", "--policy", candidate(tmp_path, WRITES_PASS, 'scope in [] and'),
        "--config", str(studio.config), env=os.environ,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    lines = done.stdout.splitlines()
    [at] = [n for n, line in enumerate(lines) if line.endswith(f"id={record.id}")]
    assert lines[at].startswith("allow -> allow ")
    assert ' token/exchange delegate McpServer{"studio"} by ' in lines[at]
    assert "    scopes: files:read svg:write -> files:read" in lines[at + 1 : at + 3]
