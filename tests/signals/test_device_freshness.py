"""Freshness of the call's device: ``requires_signal(_d: Device, name, max_age_seconds)`` is asked
about ``Device{context.device.id}`` beside the chain's principals, and refuses with
``signal_stale`` a device whose signal is missing or old, and a call that names no device: the
device requirement cannot be escaped by sending none. Decided alike by the contract, its memory,
the gateway (a device from a token claim or a trusted proxy's header, never an untrusted one),
the decision API and AuthZEN."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import httpx
import pytest

from bastion.db import Database
from bastion.decide import Authorizer
from bastion.decide.contract import (
    NO_DEVICE,
    decide_chain,
    plainly_allowed,
    remembered_calls,
    remembered_connects,
)
from bastion.facts.model import Entity
from bastion.oauth.access_token import mint_access_token
from bastion.oauth.keys import KeyRing
from bastion.oauth.store import OAuthStore
from tests.delegation.support import claims
from tests.gateway.support import start
from tests.signals.conftest import CORP, PROXY, refusal, search

NOW = 1_800_000_000
SAM, TOOL = Entity("User", "sam"), Entity("Tool", "desk/x")
LAPTOP, PHONE = Entity("Device", "laptop-7"), Entity("Device", "phone-2")
POLICY = """
actor User {}
resource Tool {}
resource Device {}
declare signal(User, String, Boolean, String, Integer);
declare signal(Device, String, Boolean, String, Integer);
declare managed(Device);
allow(_: User, "call", _: Tool);
requires_signal(_d: Device, "device_compliant", 3600) if context.server = "prod";
requires_signal(d: Device, "disk_encrypted", 600) if context.server = "vault" and managed(d);
"""


def authz(*facts: tuple, policy: str = POLICY) -> Authorizer:
    a = Authorizer(policy)
    for fact in facts:
        a.facts.insert(fact)
    return a


def compliant(device: Entity, set_at: int = NOW - 10) -> tuple:
    return ("signal", device, "device_compliant", True, "mdm", set_at)


def decide(a: Authorizer, device=None, server: str = "prod", **more):
    context = {"time": datetime.fromtimestamp(NOW, UTC), "server": server, **more}
    if device is not None:
        context["device"] = device
    return decide_chain(a, (SAM,), "call", TOOL, context)


def test_a_fresh_signal_of_the_call_s_device_lets_it_through():
    assert decide(authz(compliant(LAPTOP)), {"id": "laptop-7"}).allowed


def test_a_stale_or_missing_device_signal_refuses_naming_the_device():
    for facts in ((), (compliant(LAPTOP, NOW - 3601),)):
        decision = decide(authz(*facts), {"id": "laptop-7", "source": "token"})
        assert (decision.allowed, decision.reason) == (False, "signal_stale")
        assert decision.refused_by == LAPTOP
        assert decision.stale_signals == ("device_compliant",)


def test_a_call_that_names_no_device_is_refused_where_the_requirement_holds():
    a = authz(compliant(LAPTOP), compliant(NO_DEVICE))
    for device in (None, {}, {"id": ""}, {"id": 7}, {"id": ["laptop-7"]}, "laptop-7"):
        decision = decide(a, device)
        assert (decision.reason, decision.refused_by) == ("signal_stale", NO_DEVICE), device
        assert decision.stale_signals == ("device_compliant",)
    # Where its body does not hold, the requirement asks nothing of any device.
    assert decide(a, None, server="desk").allowed


def test_another_device_s_or_the_user_s_signal_does_not_count():
    a = authz(compliant(PHONE), compliant(SAM), ("signal", LAPTOP, "other", True, "mdm", NOW))
    assert decide(a, {"id": "laptop-7"}).refused_by == LAPTOP


def test_a_rule_that_reads_the_device_s_facts_holds_only_for_that_device():
    a = authz(compliant(LAPTOP), ("managed", LAPTOP))
    # laptop-7 is managed, and its disk_encrypted signal is missing.
    decision = decide(a, {"id": "laptop-7"}, server="vault")
    assert (decision.reason, decision.stale_signals) == ("signal_stale", ("disk_encrypted",))
    # A device nobody manages (or none) is not asked for it: what no fact says holds of neither.
    assert decide(a, {"id": "made-up"}, server="vault").allowed
    assert decide(a, None, server="vault").allowed


def test_only_a_policy_whose_rules_name_a_device_asks_about_it():
    typed = 'actor User {}\nresource Tool {}\nallow(_: User, "call", _: Tool);\n'
    fresh_x = ("signal", SAM, "x", True, "mdm", NOW - 10)
    # rule -> (the call's device is asked about, who refuses a call naming no device: the
    # principal whose fresh "x" it holds is none)
    cases = {
        "": (False, None),
        'requires_signal(_: User, "x", 60) if context.server = "desk";': (False, None),
        'requires_signal(User{"avery"}, "x", 60);': (False, None),
        'requires_signal(_: Device, "x", 60);': (True, NO_DEVICE),
        'requires_signal(Device{"laptop-7"}, "x", 60);': (True, None),
        # Untyped, it is about any actor; a policy that names no Device is not asked about one,
        # so a rule written before devices were asked keeps its meaning.
        'requires_signal(_actor, "x", 60) if context.server = "prod";': (False, None),
        # One that names a Device is: then an untyped rule holds for the device too.
        'requires_signal(_actor, "x", 60);\nrequires_signal(_: Device, "y", 60) if 1 = 2;': (
            True,
            NO_DEVICE,
        ),
    }
    for rule, (asks, refused_by) in cases.items():
        a = authz(
            fresh_x,
            policy=typed + "declare signal(User, String, Boolean, String, Integer);\n" + rule,
        )
        with a.session() as s:
            assert s.device_signals is asks, rule
        context = {"server": "prod", "time": datetime.fromtimestamp(NOW, UTC)}
        decision = decide_chain(a, (SAM,), "call", TOOL, context)
        assert (decision.allowed, decision.refused_by) == (refused_by is None, refused_by), rule


# -- answers from memory (`Remembered`): the device is part of the question ------------------


def test_a_remembered_answer_is_never_given_for_another_device_or_for_none():
    """laptop-7, not managed, needs no signal in the vault: that answer is kept. phone-2 is
    managed and has no signal; asked after it, with the same rest of the context, it must be
    refused. And the same for connects."""
    a = authz(("managed", PHONE), ("managed", NO_DEVICE))
    calls, connects = remembered_calls(), remembered_connects()
    asked = [{"id": "laptop-7"}, {"id": "phone-2"}, {"id": "laptop-7"}, None, {"id": "phone-2"}]
    for device in asked:
        context = {"server": "vault"} if device is None else {"server": "vault", "device": device}
        expected = decide_chain(a, (SAM,), "call", TOOL, dict(context))
        assert calls(a, (SAM,), "call", TOOL, context, frozenset()) == expected, device
        plain = plainly_allowed(a, (SAM,), "call", TOOL, dict(context), ())
        assert connects(a, (SAM,), "call", TOOL, context, frozenset()) is plain, device
    # laptop-7's allow was kept, and phone-2 was refused.
    assert decide_chain(a, (SAM,), "call", TOOL, {"server": "vault", "device": {"id": "phone-2"}})
    assert not calls(
        a, (SAM,), "call", TOOL, {"server": "vault", "device": {"id": "phone-2"}}, frozenset()
    ).allowed


# -- through a real gateway and the decision service ------------------------------------------

RULES = """
# tests/signals/test_device_freshness: the device of the call must be reported compliant
# within the hour for searches asking so.
resource Device {}
declare signal(Device, String, Boolean, String, Integer);
requires_signal(_d: Device, "device_compliant", 3600) if context.arguments.query = "device-fresh";
requires_signal(_d: Device, "device_compliant", 3600) if context.checked = "device";
"""
SIGNALS = {
    "posture": {
        "trusted_proxies": [f"{PROXY}/32"],
        "device_header": "X-Device-Id",
        "device_claim": "device_id",
    }
}


@pytest.fixture(scope="module")
def bastion(tmp_path_factory):
    directory = tmp_path_factory.mktemp("device-freshness")
    with start(directory, policy_extra=RULES, signals=SIGNALS) as running:
        running.directory = directory
        running.signals_key, _ = running.app.state.keys.create(
            "mdm", ["signals"], created_by="test"
        )
        running.decide_key, _ = running.app.state.keys.create(
            "pdp", ["decide", "authzen"], created_by="test"
        )
        yield running


def report(bastion, device: str, set_at: int | None = None) -> None:
    """The MDM reports ``device`` compliant (now, or at ``set_at`` through the facts)."""
    if set_at is None:
        response = bastion.http.post(
            f"{bastion.url}/v1/signals",
            json={
                "subject": {"type": "Device", "id": device},
                "name": "device_compliant",
                "value": True,
                "source": "mdm",
            },
            headers={"authorization": f"Bearer {bastion.signals_key}"},
        )
        assert response.status_code == 200, response.text
        return
    subject = Entity("Device", device)
    bastion.apply(
        [("signal", subject, "device_compliant", True, "mdm", set_at)],
        [("signal", subject, "device_compliant", None, None, None)],
    )


def with_device_claim(bastion, token: str, device: str) -> str:
    """``token`` signed again by the server's key with a ``device_id`` claim, under the same
    grant and recorded as issued: what an issuer that knows the device would send."""
    db = Database(str(bastion.directory / "bastion.db"), role="test")
    try:
        store = OAuthStore(db)
        keys = KeyRing(store, bastion.directory / "keys", retain_seconds=600, clock=time.time)
        old = claims(token)
        minted = mint_access_token(
            keys,
            issuer=old["iss"],
            subject=old["sub"],
            client_id=old["client_id"],
            resource=old["aud"],
            scope=old["scope"],
            now=time.time(),
            seconds=600,
            extra={"device_id": device},
        )
        grant_id = store.access_token_state(old["jti"]).grant_id
        store.save_access_token(minted.jti, grant_id, minted.expires_at, minted.token, minted.kid)
        return minted.token
    finally:
        db.close()


def test_the_device_of_a_token_claim_must_be_fresh_at_the_gateway(bastion):
    token = with_device_claim(bastion, bastion.token("sam", "deskhttp"), "tablet-1")
    answer = search(bastion, token, "device-fresh")
    assert refusal(answer) == "signal_stale"
    assert answer["error"]["code"] == -32003
    bastion.flush()
    record = bastion.records.get(answer["error"]["data"]["decision_id"])
    assert (record.result, record.reason) == ("deny", "signal_stale")
    assert record.deciding_principal == 'Device{"tablet-1"}'
    assert record.obligations["stale_signals"] == ["device_compliant"]
    assert record.context["device"] == {"id": "tablet-1", "source": "token"}
    # Searches that ask nothing of the device go through.
    assert refusal(search(bastion, token, "anything")) is None

    report(bastion, "tablet-1")
    assert refusal(search(bastion, token, "device-fresh")) is None
    # Its MDM went quiet: its last word, two hours old, is stale.
    report(bastion, "tablet-1", set_at=int(time.time()) - 7200)
    assert refusal(search(bastion, token, "device-fresh")) == "signal_stale"


def test_the_device_of_a_trusted_proxy_s_header_must_be_fresh(bastion):
    token = bastion.token("sam", "deskhttp")
    headers = {"X-Device-Id": "laptop-9"}
    answer = search(bastion, token, "device-fresh", PROXY, headers)
    assert refusal(answer) == "signal_stale"
    bastion.flush()
    record = bastion.records.get(answer["error"]["data"]["decision_id"])
    assert record.deciding_principal == 'Device{"laptop-9"}'
    report(bastion, "laptop-9")
    assert refusal(search(bastion, token, "device-fresh", PROXY, headers)) is None
    # The same header, and the same device's fresh signal, from an address that is no trusted
    # proxy: ignored, so the call names no device, and is refused.
    answer = search(bastion, token, "device-fresh", CORP, headers)
    assert refusal(answer) == "signal_stale"
    bastion.flush()
    record = bastion.records.get(answer["error"]["data"]["decision_id"])
    assert record.deciding_principal == repr(NO_DEVICE)
    assert record.context["device"] == {}


def test_a_call_with_no_device_is_refused_not_let_through(bastion):
    token = bastion.token("sam", "deskhttp")
    report(bastion, "laptop-9")  # some device is fresh: not this call's, which names none
    answer = search(bastion, token, "device-fresh")
    assert refusal(answer) == "signal_stale"
    assert answer["error"]["code"] == -32003
    assert refusal(search(bastion, token, "anything")) is None


def test_the_decision_api_and_authzen_ask_about_the_device_of_the_context(bastion):
    report(bastion, "laptop-9")
    headers = {"authorization": f"Bearer {bastion.decide_key}"}
    user = {"type": "User", "id": "sam"}
    tool = {"type": "Tool", "id": "desk/search_customers"}

    read = {"annotations": {"readOnlyHint": True}}

    def chain(context: dict) -> dict:
        context = {**read, **context}
        body = {"principals": [user], "action": "call", "resource": tool, "context": context}
        response = bastion.http.post(f"{bastion.url}/v1/authorize", json=body, headers=headers)
        assert response.status_code == 200, response.text
        return response.json()

    def authzen(context: dict) -> dict:
        context = {**read, **context}
        body = {"subject": user, "action": {"name": "call"}, "resource": tool, "context": context}
        answer = httpx.post(f"{bastion.url}/access/v1/evaluation", json=body, headers=headers)
        assert answer.status_code == 200, answer.text
        return answer.json()

    fresh = {"checked": "device", "device": {"id": "laptop-9"}}
    assert chain(fresh)["allowed"] is True
    assert authzen(fresh)["decision"] is True
    for context in ({"checked": "device"}, {"checked": "device", "device": {"id": "none-such"}}):
        refused = chain(context)
        assert (refused["allowed"], refused["reason"]) == (False, "signal_stale")
        assert refused["stale_signals"] == ["device_compliant"]
        device = context.get("device", {"id": ""})["id"]
        assert refused["refused_by"] == {"type": "Device", "id": device}
        answer = authzen(context)
        assert answer["decision"] is False
        assert answer["context"]["reason"] == "signal_stale"
    # The device requirement does not apply without its condition.
    assert chain({"device": {"id": "none-such"}})["allowed"] is True
