"""Every token exchange decided once its subject token is good is a decision record, as the
gateway's calls are (`bastion audit tail`, `bastion audit show`): the whole chain of principals,
the question (``delegate`` on the MCP server), the result and its reason, what the policy let
through and the rules that decided. Before, an exchange left only an audit event, which names no
rule, no policy version and no facts' sequence: a delegation could not be explained later."""

from __future__ import annotations

import json

from bastion.audit.replay import question_of
from bastion.db import Database
from bastion.facts.model import Entity
from bastion.oauth.store import OAuthStore
from tests.waits import eventually

from .support import claims
from .test_exchange_rules import cast, error, reissue


def exchange_records(studio, agent: str, count: int) -> list:
    """The decision records of token exchanges whose chain holds ``agent``, oldest first, once
    ``count`` of them are written (the server writes its records every 0.2 s)."""
    spelled = repr(Entity("Agent", agent))

    def found() -> list:
        return [
            r for r in studio.records() if r.method == "token/exchange" and spelled in r.principals
        ]

    eventually(lambda: len(found()) >= count, every=0.05)
    return found()


def chain(*agents) -> tuple[str, ...]:
    return (repr(Entity("User", "sam")), *(repr(Entity("Agent", a.client_id)) for a in agents))


def test_an_allowed_exchange_is_a_decision_record_that_explains_it(studio):
    coder, sub = cast(studio, "recorded")
    subject = studio.user_token(coder, "sam")["access_token"]
    answer = studio.exchange(coder, subject, studio.own_token(sub), scope="files:read svg:write")
    assert answer.status_code == 200, answer.text
    [record] = exchange_records(studio, sub.client_id, 1)
    assert record.principals == chain(coder, sub)
    assert (record.result, record.reason) == ("allow", "")
    assert (record.server, record.action) == ("studio", "delegate")
    assert record.target == repr(Entity("McpServer", "studio"))
    # The rules that let it through, and what passed.
    assert any(rule.startswith("may_delegate") for rule in record.rules), record.rules
    assert any(rule.startswith("delegated_scope") for rule in record.rules), record.rules
    assert record.obligations["scopes"] == ["files:read", "svg:write"]
    assert record.obligations["trimmed"] == []
    assert record.context["actor"] == sub.client_id
    assert record.policy_version is not None and record.sequence is not None
    assert record.grant_id == grant_of(studio, subject)
    # The answer names it, so that the agent's operator can have it explained.
    assert answer.json()["decision_id"] == record.id
    # The audit event names it; `bastion audit show` finds it.
    [event] = [e for e in studio.events("token.exchanged") if e.client_id == sub.client_id]
    assert event.detail["decision_id"] == record.id
    shown = json.loads(studio.command("audit", "show", record.id))
    assert shown["record"]["principals"] == list(chain(coder, sub))
    assert shown["policy"]["version"] == record.policy_version
    # `bastion audit replay` asks it again as the token endpoint asked it, not as a call
    # (allow(Agent, "delegate", ...)): the scopes asked for, for the whole chain.
    question = question_of(record)
    assert tuple(map(repr, question.principals)) == chain(coder, sub)
    assert (question.action, question.requested) == ("delegate", ("files:read", "svg:write"))


def grant_of(studio, token: str) -> str:
    """The grant ``token`` belongs to: the caller's, as records name it."""
    db = Database(studio.database, role="test")
    try:
        return OAuthStore(db).access_token_state(claims(token)["jti"]).grant_id
    finally:
        db.close()


def test_a_refused_exchange_is_a_decision_record_with_the_reason(studio):
    coder, stranger = cast(studio, "refused-recorded", sub_roles=())
    subject = studio.user_token(coder, "sam")["access_token"]
    refused = studio.exchange(coder, subject, studio.own_token(stranger))
    assert error(refused) == (400, "invalid_request")
    [record] = exchange_records(studio, stranger.client_id, 1)
    assert record.principals == chain(coder, stranger)
    assert (record.result, record.reason) == ("deny", "not_permitted")
    assert record.target == repr(Entity("McpServer", "studio"))
    assert record.rules == ()  # no rule let it through
    assert refused.json()["decision_id"] == record.id  # beside error and error_description
    [event] = [
        e
        for e in studio.events("token.exchange_refused")
        if e.detail.get("actor") == stranger.client_id
    ]
    assert event.detail["decision_id"] == record.id


def test_scopes_the_policy_lets_none_of_pass_are_a_refusal_on_record(studio):
    coder, sub = cast(studio, "none-pass")
    subject = studio.user_token(coder, "sam")["access_token"]
    studio.signal("sam", "device_compliant", False)
    try:
        refused = studio.exchange(coder, subject, studio.own_token(sub), scope="svg:write")
    finally:
        studio.signal("sam", "device_compliant", True)
    assert error(refused) == (400, "invalid_scope")
    [record] = exchange_records(studio, sub.client_id, 1)
    assert (record.result, record.reason) == ("deny", "no_scope_delegated")
    assert record.obligations["trimmed"] == ["svg:write"]
    assert any(rule.startswith("may_delegate") for rule in record.rules), record.rules


def test_a_refusal_before_the_policy_is_recorded_with_what_the_client_was_told(studio):
    coder, sub = cast(studio, "early")
    subject = studio.user_token(coder, "sam")["access_token"]
    someone_else = reissue(studio, subject, may_act={"sub": "someone-else"})
    refused = studio.exchange(coder, someone_else, studio.own_token(sub))
    assert error(refused) == (400, "invalid_request")
    [record] = exchange_records(studio, sub.client_id, 1)
    assert record.principals == chain(coder, sub)
    assert record.result == "deny"
    assert record.reason == f"invalid_request: {refused.json()['error_description']}"
    assert record.deciding_principal == ""  # no policy was asked
    assert refused.json()["decision_id"] == record.id


def test_a_refusal_of_a_subject_token_that_is_no_good_names_no_decision(studio):
    """Before the subject token is known good there is no chain to decide for: no record, and
    the answer is the RFC's error alone."""
    coder, sub = cast(studio, "no-good")
    refused = studio.exchange(coder, "not-a-token", studio.own_token(sub))
    assert error(refused) == (400, "invalid_request")
    assert set(refused.json()) == {"error", "error_description"}
