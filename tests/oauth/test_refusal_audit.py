"""Refusals of requests that prove nothing are aggregated, so a flood of them writes a bounded
number of audit rows and loses no count; a refusal that concerns a known client or user (a
confidential client that proved its secret, a token this server signed) keeps its own row."""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import logging
import signal
import sqlite3
import tempfile
from pathlib import Path
from urllib.parse import urlencode

import httpx

from bastion.audit import AuditLog
from bastion.audit.refusals import RefusalLog
from bastion.db import Database
from bastion.oauth import InvalidToken
from bastion.oauth.server import AuthorizationServer
from tests.gateway.support import serve_quickstart
from tests.outage_rounds import logged, through_a_cut
from tests.relays import Relay
from tests.waits import PATIENCE, eventually

from .support import (
    Bastion,
    Clock,
    allow_introspection,
    hidden_fields,
    make_settings,
    pkce_pair,
)

SERVER_LOG = "bastion.oauth.server"

IAT = {"Authorization": "Bearer initial-access-token-for-tests"}


def count(events) -> int:
    """How many refusals the rows stand for (a row of repeats stands for that many)."""
    return sum(e.detail.get("repeats", 1) for e in events)


def test_a_token_endpoint_flood_writes_two_rows_and_loses_no_count(bastion: Bastion):
    for n in range(300):
        response = bastion.token(grant_type="authorization_code", client_id=f"nobody-{n}")
        assert response.status_code == 401
    assert len(bastion.server.audit.events("token.refused")) == 1
    first = bastion.server.audit.events("token.refused")[0]
    assert first.detail["address"] == "127.0.0.1" and first.detail["reason"] == "invalid_client"
    assert first.detail["claimed_client_id"] == "nobody-0"

    # When the window has closed, one more row carries the count of the rest.
    bastion.clock.advance(61)
    bastion.server.refusals.flush()
    events = bastion.server.audit.events("token.refused")
    assert len(events) == 2 and count(events) == 300
    summary = next(e for e in events if "repeats" in e.detail)
    assert summary.detail["repeats"] == 299
    assert summary.detail["address"] == "127.0.0.1"
    assert summary.detail["since"] <= summary.detail["until"]


def test_an_authorization_request_flood_for_a_known_client_is_aggregated(bastion: Bastion):
    client = bastion.register()
    _, challenge = pkce_pair()
    params = bastion.authorize_params(client, challenge, scope="admin")
    for _ in range(100):
        response = bastion.http.get(f"{bastion.url}/authorize?{urlencode(params)}")
        # A self-registered client: the error is shown, not redirected (docs/oauth.md).
        assert response.status_code == 400 and "invalid_scope" in response.text
    assert len(bastion.server.audit.events("authorization.refused")) == 1
    bastion.server.refusals.flush(everything=True)
    events = bastion.server.audit.events("authorization.refused")
    assert len(events) == 2 and count(events) == 100
    assert {e.client_id for e in events} == {client["client_id"]}


def test_a_forged_form_flood_is_aggregated(bastion: Bastion):
    client = bastion.register()
    _, challenge = pkce_pair()
    page = bastion.http.get(
        f"{bastion.url}/authorize?{urlencode(bastion.authorize_params(client, challenge))}"
    )
    fields = {**hidden_fields(page.text), "csrf_token": "forged"}
    for _ in range(50):
        response = bastion.http.post(
            f"{bastion.url}/authorize/login", data={**fields, "username": "a", "password": "b"}
        )
        assert response.status_code == 403
    bastion.server.refusals.flush(everything=True)
    events = bastion.server.audit.events("authorization.csrf_refused")
    assert len(events) == 2 and count(events) == 50


def test_a_confidential_client_that_proved_its_secret_keeps_a_row_per_refusal(bastion: Bastion):
    body = {
        "token_endpoint_auth_method": "client_secret_basic",
        "grant_types": ["client_credentials"],
        "redirect_uris": [],
        "scope": "tools:read",
    }
    client = bastion.http.post(f"{bastion.url}/register", json=body, headers=IAT).json()
    secret = f"{client['client_id']}:{client['client_secret']}".encode()
    basic = {"Authorization": "Basic " + base64.b64encode(secret).decode()}
    for _ in range(3):
        response = bastion.http.post(
            f"{bastion.url}/token",
            data={"grant_type": "client_credentials", "resource": "https://elsewhere/mcp"},
            headers=basic,
        )
        assert response.status_code == 400
    events = bastion.server.audit.events("token.refused")
    assert len(events) == 3 and {e.client_id for e in events} == {client["client_id"]}


def test_forged_tokens_are_aggregated_but_a_revoked_token_keeps_its_row(bastion: Bastion):
    verifier = bastion.server.verifier
    for n in range(200):
        with contextlib.suppress(InvalidToken):
            verifier.verify(f"forged.token.{n}", bastion.resource, address="192.0.2.7")
    events = bastion.server.audit.events("token.refused")
    assert len(events) == 1 and events[0].detail["address"] == "192.0.2.7"

    client = bastion.register()
    access = bastion.tokens_for(client)["access_token"]
    jti = verifier.verify(access, bastion.resource).jti
    bastion.server.store.revoke_access_token(jti, bastion.clock())
    for _ in range(3):
        with contextlib.suppress(InvalidToken):
            verifier.verify(access, bastion.resource)
    revoked = [e for e in bastion.server.audit.events("token.refused") if e.subject == "alice"]
    assert len(revoked) == 3
    assert {(e.client_id, e.detail["reason"]) for e in revoked} == {
        (client["client_id"], "revoked")
    }


def test_distinct_keys_are_bounded_so_a_window_writes_a_bounded_number_of_rows(sqlite_url):
    clock = Clock()
    audit = AuditLog(Database(sqlite_url), clock)
    refusals = RefusalLog(audit, window_seconds=60, max_keys=100, clock=clock)
    for n in range(5000):
        refusals.record("login.failed", address=f"10.0.{n // 250}.{n % 250}", reason="no_password")
    refusals.flush(everything=True)
    events = audit.events("login.failed", limit=10_000)
    assert len(events) <= 2 * (100 + 1)
    assert count(events) == 5000
    assert any(e.detail["address"] == "*" for e in events)


def test_events_about_something_known_are_counted_under_its_name_and_never_merged(sqlite_url):
    # Introspection answers about tokens this server issued: each key names its token in every
    # row, and past max_keys an answer is written as a row of its own, never counted as "*".
    clock = Clock()
    audit = AuditLog(Database(sqlite_url), clock)
    answers = RefusalLog(audit, window_seconds=60, max_keys=3, clock=clock)
    for _ in range(3):
        for n in range(10):
            counted = {"jti": f"jti-{n}", "active": True}
            answers.record(
                "token.introspected",
                address="192.0.2.10",
                reason=None,
                client_id="resource-server",
                subject="alice",
                counted=counted,
                scope="tools:read",
            )
    answers.flush(everything=True)
    events = audit.events("token.introspected", limit=1000)
    assert count(events) == 30
    assert {e.detail["address"] for e in events} == {"192.0.2.10"}
    for event in events:
        assert event.subject == "alice" and event.client_id == "resource-server"
        assert event.detail["active"] is True
    per_token = {}
    for event in events:
        per_token.setdefault(event.detail["jti"], []).append(event.detail.get("repeats", 1))
    assert {jti: sum(counts) for jti, counts in per_token.items()} == {
        f"jti-{n}": 3 for n in range(10)
    }
    # The first three keys: a first row and a row of two repeats; the others: a row each.
    assert sorted(len(counts) for counts in per_token.values()) == [2] * 3 + [3] * 7


def test_what_a_refused_request_sends_is_kept_bounded_in_its_row(bastion: Bastion):
    # An aggregated row holds what the first refused request sent (a claimed client id, a
    # token's alg): a flood from many addresses writes many such rows, so each is bounded.
    huge = "x" * 40_000
    header = base64.urlsafe_b64encode(f'{{"alg": "{huge}"}}'.encode()).decode().rstrip("=")
    with contextlib.suppress(InvalidToken):
        bastion.server.verifier.verify(f"{header}.e30.c2ln", bastion.resource, address="192.0.2.8")
    assert bastion.token(grant_type="authorization_code", client_id=huge).status_code == 401
    rows = bastion.server.audit.events("token.refused")
    assert len(rows) == 2
    for row in rows:
        assert len(json.dumps(row.detail)) < 2000, row.detail


def test_the_counts_of_an_open_window_are_written_as_they_go_and_add_up(sqlite_url):
    # Every `write_progress` writes the repeats counted since the key's last row (a row of
    # repeats with its own since and until) and leaves the window open: the rows of a key add
    # up to its refusals, and each stretch starts where the one before it ended.
    clock = Clock()
    audit = AuditLog(Database(sqlite_url), clock)
    refusals = RefusalLog(audit, window_seconds=60, clock=clock)
    for _ in range(10):
        refusals.record("login.failed", address="192.0.2.9", reason="no_password")
        clock.advance(1)
    refusals.write_progress()
    assert [e.detail.get("repeats") for e in audit.events("login.failed")] == [9, None]
    refusals.write_progress()  # nothing counted since: no row
    assert len(audit.events("login.failed")) == 2
    for _ in range(5):
        refusals.record("login.failed", address="192.0.2.9", reason="no_password")
        clock.advance(1)
    clock.advance(60)
    refusals.flush()  # the window has closed: its last stretch
    rows = sorted(audit.events("login.failed"), key=lambda e: e.at)
    assert count(rows) == 15 and "repeats" not in rows[0].detail
    first, second = rows[1].detail, rows[2].detail
    assert (first["repeats"], second["repeats"]) == (9, 5)
    assert first["since"] <= rows[0].at < first["until"] == second["since"] < second["until"]
    assert {r.detail["address"] for r in rows} == {"192.0.2.9"}


def _refusal_rows(database: Path, kind: str) -> list[dict]:
    with sqlite3.connect(database) as db:
        rows = db.execute("SELECT detail FROM audit_events WHERE kind = ?", (kind,)).fetchall()
    return [json.loads(row[0]) for row in rows]


def _counted(database: Path, kind: str) -> int:
    return sum(row.get("repeats", 1) for row in _refusal_rows(database, kind))


def test_a_process_killed_outright_keeps_the_refusals_counted_until_its_last_write(tmp_path):
    """A burst of refused token requests (a password-guessing burst), then `kill -9` well
    inside the refusal window: the database holds the repeats counted up to the last periodic
    write (``repeat_write_seconds``), not only the burst's first row."""
    server, url = serve_quickstart(tmp_path)
    database = tmp_path / "bastion.db"
    try:
        with httpx.Client(timeout=10) as http:

            def refuse(n: int) -> None:
                response = http.post(
                    f"{url}/token",
                    data={"grant_type": "authorization_code", "client_id": f"nobody-{n}"},
                )
                assert response.status_code == 401, response.text

            for n in range(40):
                refuse(n)
            # Waits for the first periodic write (every 5 s by default), far less than the
            # window (60 s) whose close would write the count otherwise.
            eventually(lambda: _counted(database, "token.refused") >= 40, every=0.2)
            for n in range(40, 50):  # counted after the last write: these may be lost
                refuse(n)
        server.send_signal(signal.SIGKILL)
        server.wait(PATIENCE)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    rows = _refusal_rows(database, "token.refused")
    assert "repeats" not in rows[0] and rows[0]["claimed_client_id"] == "nobody-0"
    assert _counted(database, "token.refused") >= 40, rows


def test_counts_whose_rows_could_not_be_written_are_written_later(sqlite_url):
    # The database refuses audit rows for a while (here a trigger another connection adds; in
    # production an outage): the refusals of that time are still counted once it takes them.
    clock = Clock()
    db = Database(sqlite_url)
    audit = AuditLog(db, clock)
    refusals = RefusalLog(audit, window_seconds=60, clock=clock)
    refusals.record("login.failed", address="192.0.2.9", reason="no_password")
    for _ in range(4):
        refusals.record("login.failed", address="192.0.2.9", reason="no_password")
    other = Database(sqlite_url)
    other.execute(
        "CREATE TRIGGER refuse BEFORE INSERT ON audit_events"
        " BEGIN SELECT RAISE(ABORT, 'audit refused'); END"
    )
    clock.advance(61)
    for _ in range(3):  # a new window: its first row, and the closed window's, fail
        with contextlib.suppress(Exception):
            refusals.record("login.failed", address="192.0.2.9", reason="no_password")
    with contextlib.suppress(Exception):
        refusals.flush(everything=True)
    other.execute("DROP TRIGGER refuse")
    refusals.flush(everything=True)
    assert count(audit.events("login.failed")) == 8


def _confidential(bastion: Bastion) -> tuple[dict, dict[str, str]]:
    body = {
        "token_endpoint_auth_method": "client_secret_basic",
        "grant_types": ["client_credentials"],
        "redirect_uris": [],
        "scope": "tools:read",
    }
    client = bastion.http.post(f"{bastion.url}/register", json=body, headers=IAT).json()
    secret = f"{client['client_id']}:{client['client_secret']}".encode()
    return client, {"Authorization": "Basic " + base64.b64encode(secret).decode()}


def test_refused_introspections_are_audited_apart_from_answers(bastion: Bastion):
    """RFC 7662: a client not allowed to introspect, a wrong secret, a request without a token
    leave ``introspection.refused`` rows (a row each for a client that proved its secret, else
    aggregated); an allowed client's answers, active or not, leave none of those (they are
    ``token.introspected``: tests/oauth/test_introspection_audit.py)."""
    allowed, allowed_auth = _confidential(bastion)
    allow_introspection(bastion, allowed["client_id"])
    other, other_auth = _confidential(bastion)
    tokens = bastion.tokens_for(bastion.register())
    url = f"{bastion.url}/introspect"
    for token in (tokens["access_token"], tokens["refresh_token"], "unknown"):
        assert (
            bastion.http.post(url, data={"token": token}, headers=allowed_auth).status_code == 200
        )
    assert bastion.server.audit.events("introspection.refused") == []

    for _ in range(2):
        refused = bastion.http.post(url, data={"token": tokens["access_token"]}, headers=other_auth)
        assert refused.status_code == 403 and refused.json()["error"] == "unauthorized_client"
    missing = bastion.http.post(url, data={"token_type_hint": "access_token"}, headers=allowed_auth)
    assert missing.status_code == 400
    proven = bastion.server.audit.events("introspection.refused")
    assert sorted((e.client_id, e.detail["error"]) for e in proven) == sorted(
        [(other["client_id"], "unauthorized_client")] * 2
        + [(allowed["client_id"], "invalid_request")]
    )

    wrong = {"Authorization": "Basic " + base64.b64encode(b"guess:wrong").decode()}
    for _ in range(50):
        response = bastion.http.post(url, data={"token": tokens["access_token"]}, headers=wrong)
        assert response.status_code == 401
    bastion.server.refusals.flush(everything=True)
    guessed = [e for e in bastion.server.audit.events("introspection.refused") if not e.client_id]
    assert len(guessed) == 2 and count(guessed) == 50
    assert {e.detail["reason"] for e in guessed} == {"invalid_client"}


def test_refused_revocations_are_audited(bastion: Bastion):
    """RFC 7009: a revocation refused (no token; a client that does not authenticate) leaves a
    ``revocation.refused`` row, a row each for a client that proved its secret."""
    client, auth = _confidential(bastion)
    url = f"{bastion.url}/revoke"
    missing = bastion.http.post(url, data={"token_type_hint": "access_token"}, headers=auth)
    assert missing.status_code == 400
    wrong = {"Authorization": "Basic " + base64.b64encode(b"guess:wrong").decode()}
    assert bastion.http.post(url, data={"token": "t"}, headers=wrong).status_code == 401
    events = bastion.server.audit.events("revocation.refused")
    assert sorted((e.client_id or "", e.detail["error"]) for e in events) == [
        ("", "invalid_client"),
        (client["client_id"], "invalid_request"),
    ]


def test_a_revocation_of_another_clients_token_is_answered_alike_and_audited(bastion: Bastion):
    """RFC 7009 §2.2: a client revoking a token not its own gets 200, as for its own, and the
    token lives on; a client holding another's token is a stolen token's trace, so it leaves a
    ``revocation.refused`` row (reason ``not_its_token``) naming both clients, never the token."""
    owner, holder = bastion.register(), bastion.register()
    tokens = bastion.tokens_for(owner)
    for token in (tokens["access_token"], tokens["refresh_token"]):
        response = bastion.http.post(
            f"{bastion.url}/revoke", data={"token": token, "client_id": holder["client_id"]}
        )
        assert response.status_code == 200
    bastion.server.verifier.verify(tokens["access_token"], bastion.resource)
    events = bastion.server.audit.events("revocation.refused")
    assert [(e.client_id, e.detail["reason"], e.detail["token_client_id"]) for e in events] == [
        (holder["client_id"], "not_its_token", owner["client_id"])
    ]
    assert all(tokens[t] not in str(events[0].detail) for t in ("access_token", "refresh_token"))
    bastion.server.refusals.flush(everything=True)
    assert count(bastion.server.audit.events("revocation.refused")) == 2


def test_a_database_outage_is_logged_once_by_the_round_writing_counts(postgres_url, caplog):
    """The round that writes the counts of open windows (every ``repeat_write_seconds``) goes on
    while the database is away, and says so once, not at every round; once it is back, once
    that the counts are written again, and none was lost. The outage is the test's own: it
    reaches PostgreSQL through a relay it cuts."""
    caplog.set_level(logging.DEBUG, logger=SERVER_LOG)
    with Relay(("127.0.0.1", 5432)) as relay, tempfile.TemporaryDirectory() as keys:
        url = postgres_url.replace("127.0.0.1:5432", f"127.0.0.1:{relay.port}")
        issuer = "http://127.0.0.1:9"
        settings = make_settings(issuer, f"{issuer}/mcp", f"{issuer}/other", keys)
        db = Database(url)
        server = AuthorizationServer(settings, db, clock=Clock())
        fast = dataclasses.replace(settings.refusal_audit, repeat_write_seconds=0.01)
        server.settings = dataclasses.replace(settings, refusal_audit=fast)

        def refused() -> None:
            server.refusals.record("login.failed", address="192.0.2.9", reason="no_password")

        said = logged(caplog, SERVER_LOG, "refusals")
        try:
            refused()  # its row written at once
            # Four more counted in memory while the database is away.
            through_a_cut(
                relay,
                server.write_counts_forever,
                said,
                meanwhile=lambda: [refused() for _ in range(4)],
            )
            lines = said(logging.WARNING)
            assert len(lines) == 2 and "again" in lines[1], lines
            server.refusals.flush(everything=True)
            assert count(server.audit.events("login.failed")) == 5
        finally:
            db.close()
