"""Freshness: ``requires_signal(actor, name, max_age_seconds)`` refuses, with reason
``signal_stale``, a principal whose required signal is missing or older than the age allowed;
each required signal on its own, and fail closed."""

from __future__ import annotations

import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from bastion.decide import Authorizer
from bastion.decide.contract import decide_chain
from bastion.facts.model import Entity
from tests.signals.conftest import refusal, search, set_signal

NOW = 1_800_000_000
SAM, AGENT, TOOL = Entity("User", "sam"), Entity("Agent", "a1"), Entity("Tool", "desk/x")
POLICY = """
actor User {}
actor Agent {}
resource Tool {}
declare signal(User, String, Boolean, String, Integer);
declare signal(Agent, String, String, String, Integer);
allow(_: User, "call", _: Tool);
allow(_: Agent, "call", _: Tool);
requires_signal(_: User, "device_compliant", 300);
requires_signal(_: User, "risk_checked", 60) if context.strict = true;
requires_signal(_: Agent, "attested", "soon") if context.broken = true;
"""


def authz(*facts: tuple) -> Authorizer:
    a = Authorizer(POLICY)
    for fact in facts:
        a.facts.insert(fact)
    return a


def decide(a: Authorizer, **context):
    ctx = {"time": datetime.fromtimestamp(NOW, UTC), **context}
    return decide_chain(a, (SAM, AGENT), "call", TOOL, ctx)


def compliant(set_at: int, value: bool = True) -> tuple:
    return ("signal", SAM, "device_compliant", value, "mdm", set_at)


def test_a_fresh_required_signal_lets_the_call_through():
    assert decide(authz(compliant(NOW - 10))).allowed


def test_a_missing_required_signal_refuses_with_signal_stale():
    decision = decide(authz())
    assert not decision.allowed
    assert decision.reason == "signal_stale"
    assert decision.stale_signals == ("device_compliant",)
    assert decision.refused_by == SAM


def test_a_signal_older_than_the_age_allowed_refuses():
    decision = decide(authz(compliant(NOW - 301)))
    assert (decision.allowed, decision.reason) == (False, "signal_stale")
    assert decide(authz(compliant(NOW - 300))).allowed


def test_freshness_is_not_the_value_the_policy_judges_that_itself():
    # A fresh "false" is fresh: whether it allows the call is the policy's other rules' business.
    assert decide(authz(compliant(NOW - 5, value=False))).allowed


def test_each_required_signal_is_checked_on_its_own():
    a = authz(compliant(NOW - 10), ("signal", SAM, "risk_checked", True, "siem", NOW - 61))
    decision = decide(a, strict=True)
    assert decision.reason == "signal_stale"
    assert decision.stale_signals == ("risk_checked",)


def test_another_subjects_signal_does_not_count():
    other = ("signal", Entity("User", "avery"), "device_compliant", True, "mdm", NOW)
    assert decide(authz(other)).reason == "signal_stale"


def test_a_requirement_that_cannot_be_checked_refuses():
    decision = decide(authz(compliant(NOW)), broken=True)
    assert decision.reason == "signal_stale"
    assert decision.refused_by == AGENT


def test_a_policy_without_signals_requires_none():
    a = Authorizer('actor User {}\nresource Tool {}\nallow(_: User, "call", _: Tool);')
    assert decide_chain(a, (SAM,), "call", TOOL, {}).allowed


def test_a_denied_call_stays_not_permitted_whatever_its_signals():
    a = Authorizer(POLICY.replace('allow(_: User, "call", _: Tool);', ""))
    decision = decide(a)
    assert not decision.allowed and decision.reason is None and decision.refused_by == SAM


def test_the_device_compliance_example_passes_its_own_tests():
    example = Path(__file__).resolve().parents[2] / "examples" / "device_compliance.polar"
    done = subprocess.run(
        [sys.executable, "-m", "bastion.cli", "policy", "test", str(example)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "4 passed, 0 failed" in done.stdout


# -- through the gateway ----------------------------------------------------------------------


def test_a_missing_or_stale_required_signal_refuses_the_call_at_the_gateway(bastion):
    token = bastion.token("avery", "deskhttp")
    avery = Entity("User", "avery")
    answer = search(bastion, token, "fresh-only")
    assert refusal(answer) == "signal_stale"
    assert answer["error"]["code"] == -32003
    # The refusal is recorded like any other, with the signals it missed.
    bastion.flush()
    record = bastion.records.get(answer["error"]["data"]["decision_id"])
    assert (record.result, record.reason) == ("deny", "signal_stale")
    assert record.obligations["stale_signals"] == ["risk_checked"]
    assert record.deciding_principal == repr(avery)

    set_signal(bastion, "avery", "risk_checked", True, source="siem")
    assert refusal(search(bastion, token, "fresh-only")) is None
    # Other searches never needed it.
    assert refusal(search(bastion, token, "anything")) is None

    # The source went quiet: its last word, three minutes old, is stale (fail closed).
    old = int(time.time()) - 180
    bastion.apply(
        [("signal", avery, "risk_checked", True, "siem", old)],
        [("signal", avery, "risk_checked", None, None, None)],
    )
    assert refusal(search(bastion, token, "fresh-only")) == "signal_stale"
