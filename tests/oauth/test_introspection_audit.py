"""RFC 7662 introspection answers are audit events (``token.introspected``): who asked, which
token (never its text), whose it is, the answer and, when inactive, why; the answer the client
gets is unchanged. A token this server knows gets a row per answer; one it does not (unknown,
malformed, forged) is aggregated, so a flood of them writes a bounded number of rows."""

from __future__ import annotations

import base64
import json

import pytest

from bastion.audit import AuditEvent

from .support import Bastion, allow_introspection, running_bastion
from .test_endpoints import basic, confidential

ACTIVE_KEYS = {"active", "token_type", "client_id", "sub", "aud", "scope", "exp", "iss"}


def resource_server(bastion: Bastion) -> dict:
    allowed = confidential(bastion)
    allow_introspection(bastion, allowed["client_id"])
    return allowed


def introspect(bastion: Bastion, asker: dict, token: str) -> dict:
    response = bastion.http.post(
        f"{bastion.url}/introspect", data={"token": token}, headers=basic(asker)
    )
    assert response.status_code == 200, response.text
    return response.json()


def claims(token: str) -> dict:
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


def answers(bastion: Bastion) -> list[AuditEvent]:
    """The introspection answers recorded, oldest first."""
    return list(reversed(bastion.server.audit.events("token.introspected")))


def count(events: list[AuditEvent]) -> int:
    """How many answers the rows stand for (a row of repeats stands for that many)."""
    return sum(e.detail.get("repeats", 1) for e in events)


def test_each_answer_about_a_known_token_has_a_row_naming_who_asked_and_whose_token(
    database_url, tmp_path
):
    with running_bastion(database_url, tmp_path) as bastion:
        asker = resource_server(bastion)
        agent = bastion.register()
        tokens = bastion.tokens_for(agent)
        access = claims(tokens["access_token"])
        grant_id = bastion.server.store.refresh_token(tokens["refresh_token"])[0]
        whose = {"token_client_id": agent["client_id"], "grant_id": grant_id}

        active = introspect(bastion, asker, tokens["access_token"])
        # A password sign-in: when (auth_time) and how (amr) the token says (RFC 9470 §3).
        signed_in = {"iat", "jti", "auth_time", "amr"}
        assert active["active"] is True and set(active) == ACTIVE_KEYS | signed_in
        assert introspect(bastion, asker, tokens["refresh_token"])["active"] is True
        for _ in range(5):  # a resource server asking on every request: counted, not rows
            assert introspect(bastion, asker, tokens["access_token"])["active"] is True
        first, refresh = answers(bastion)
        for row in (first, refresh):
            assert row.client_id == asker["client_id"]  # who asked
            assert row.subject == "alice"  # whose token
            assert row.detail.items() >= whose.items()
            assert row.detail["agents"] == [agent["client_id"]]
            assert row.detail["active"] is True and row.detail["reason"] is None
            assert row.detail["address"] == "127.0.0.1"
        assert first.detail["token_kind"] == "access_token"
        assert first.detail["jti"] == access["jti"]
        assert first.detail["scope"] == "tools:read"
        assert first.detail["aud"] == bastion.resource
        assert refresh.detail["token_kind"] == "refresh_token"

        # Inactive answers say why in their rows, never in the answer (RFC 7662 §2.2); a changed
        # answer is written at once.
        rotated = bastion.token(
            grant_type="refresh_token",
            refresh_token=tokens["refresh_token"],
            client_id=agent["client_id"],
        ).json()
        assert introspect(bastion, asker, tokens["refresh_token"]) == {"active": False}
        bastion.http.post(
            f"{bastion.url}/revoke",
            data={"token": rotated["refresh_token"], "client_id": agent["client_id"]},
        )
        assert introspect(bastion, asker, tokens["access_token"]) == {"active": False}
        assert introspect(bastion, asker, rotated["refresh_token"]) == {"active": False}
        inactive = answers(bastion)[2:]
        assert [(e.detail["token_kind"], e.detail["reason"]) for e in inactive] == [
            ("refresh_token", "refresh_token_used"),
            ("access_token", "revoked"),
            ("refresh_token", "revoked"),
        ]
        for row in inactive:
            assert row.client_id == asker["client_id"] and row.subject == "alice"
            assert row.detail["active"] is False and "repeats" not in row.detail
            assert row.detail["token_client_id"] == agent["client_id"] and row.detail["grant_id"]
        assert inactive[1].detail["jti"] == access["jti"]
        assert inactive[1].detail.items() >= whose.items()

        # Once the window has closed, the repeats are one row naming the same asker and token.
        fresh = bastion.tokens_for(agent)
        bastion.clock.advance(bastion.server.settings.refresh_token_seconds + 1)
        assert introspect(bastion, asker, fresh["access_token"]) == {"active": False}
        assert introspect(bastion, asker, fresh["refresh_token"]) == {"active": False}
        rows = answers(bastion)
        repeats = [e for e in rows if "repeats" in e.detail]
        assert len(repeats) == 1 and repeats[0].detail["repeats"] == 5
        assert repeats[0].client_id == asker["client_id"] and repeats[0].subject == "alice"
        assert (
            repeats[0].detail.items()
            >= {**whose, "token_kind": "access_token", "jti": access["jti"], "active": True}.items()
        )
        expired = [e for e in rows if e.detail["reason"] == "expired"]
        assert sorted(e.detail["token_kind"] for e in expired) == ["access_token", "refresh_token"]
        assert all(e.subject == "alice" and e.detail["active"] is False for e in expired)


def test_no_audit_row_holds_the_text_of_a_token_introspected(bastion: Bastion):
    asker = resource_server(bastion)
    tokens = bastion.tokens_for(bastion.register())
    asked = [tokens["access_token"], tokens["refresh_token"], "opaque-unknown-token-1234567890"]
    header, payload, signature = tokens["access_token"].split(".")
    forged = f"{header}.{payload}.{signature[::-1]}"
    for token in [*asked, forged]:
        introspect(bastion, asker, token)
    bastion.server.introspections.flush(everything=True)
    assert count(answers(bastion)) == 4
    stored = [json.dumps(row) for row in bastion.db.execute("SELECT * FROM audit_events")]
    for secret in [*asked, signature, signature[::-1]]:
        assert not any(secret in row for row in stored), secret


def test_a_flood_of_unknown_tokens_writes_a_bounded_number_of_rows_and_loses_no_count(
    bastion: Bastion,
):
    asker = resource_server(bastion)
    tokens = bastion.tokens_for(bastion.register())
    header, payload, signature = tokens["access_token"].split(".")
    for n in range(200):
        assert introspect(bastion, asker, f"unknown-token-{n}") == {"active": False}
        forged = f"{header}.{payload}.{signature[:-4]}{n:04d}"
        assert introspect(bastion, asker, forged) == {"active": False}
    # The first of each reason is written at once, naming who asked; the rest are counted.
    rows = answers(bastion)
    assert sorted(e.detail["reason"] for e in rows) == ["format", "signature"]
    for row in rows:
        assert row.client_id == asker["client_id"] and row.detail["active"] is False
        assert row.subject is None and "jti" not in row.detail
    bastion.clock.advance(bastion.server.settings.refusal_audit.window_seconds + 1)
    bastion.server.introspections.flush()
    rows = answers(bastion)
    assert len(rows) == 4 and count(rows) == 400
    assert {e.client_id for e in rows} == {asker["client_id"]}


@pytest.mark.parametrize("token", ["unknown-token", "a.b.c"])
def test_an_unknown_token_is_answered_inactive_and_nothing_more(bastion: Bastion, token: str):
    asker = resource_server(bastion)
    response = bastion.http.post(
        f"{bastion.url}/introspect", data={"token": token}, headers=basic(asker)
    )
    assert response.status_code == 200
    assert response.content == b'{"active":false}'
    assert len(answers(bastion)) == 1
