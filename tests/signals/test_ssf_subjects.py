"""Subjects of a stream (SSF 1.0 §8.1.3) against a real transmitter that sends events only about
the subjects added to the stream (``default_subjects`` "NONE", §7.1) and a real bastion: bastion
adds the subjects of its ``users`` table and the accounts linked to the transmitter's login
provider (``linked_accounts``), removes those no longer there (an account unlinked), and a
subject the transmitter refuses to add or remove is reported and tried again, never taken as
done."""

from __future__ import annotations

import json
import os
import time

import pytest

from bastion.cli import main
from bastion.identity.accounts import release_account

from .test_ssf import _toml, jti_of, received, streams, wait_until
from .transmitter import BEARER, CAEP, Transmitter

AUDIENCE = "https://bastion.test/ssf"
PUSH_TOKEN = "push-credential-of-the-subjects-stream"
LOGIN_ISSUER = "https://login.example.com"
SAM = {"format": "email", "email": "sam@example.com"}
LEE = {"format": "email", "email": "lee@example.com"}
ROWAN = {"format": "email", "email": "rowan@example.com"}


def account(sub: str) -> dict:
    return {"format": "iss_sub", "iss": LOGIN_ISSUER, "sub": sub}


@pytest.fixture(scope="module")
def bastion(tmp_path_factory):
    from tests.gateway.support import start
    from tests.oauth.support import free_socket, serve

    os.environ["BASTION_TEST_SUBJECTS_PUSH"] = PUSH_TOKEN
    os.environ["BASTION_TEST_SSF_BEARER"] = BEARER
    idp = Transmitter(AUDIENCE)
    idp.default_subjects = "NONE"
    idp.subject_endpoints = True
    # Refused until the test lets it through: reported, tried again.
    idp.subject_answers[idp.subject_key(ROWAN)] = 403
    with serve(idp.app(), free_socket()) as url:
        idp.url = url
        table = {
            "ssf": {
                "transmitters": [
                    {
                        "name": "idp",
                        "issuer": url,
                        "audience": AUDIENCE,
                        "delivery": "push",
                        "bearer_env": "BASTION_TEST_SSF_BEARER",
                        "push_token_env": "BASTION_TEST_SUBJECTS_PUSH",
                        "users": {
                            "email:Sam@Example.com": "sam",
                            "email:lee@example.com": "lee",
                            "email:rowan@example.com": "rowan",
                        },
                        "linked_accounts": "corp",
                        "subjects_sync_seconds": 0.2,
                    }
                ]
            }
        }
        identity = {
            "local_passwords": True,
            "providers": [
                {
                    "id": "corp",
                    "issuer": LOGIN_ISSUER,
                    "client_id": "bastion",
                    "client_secret": "not-used-by-these-tests",
                }
            ],  # fmt: skip
        }
        with start(
            tmp_path_factory.mktemp("subjects"), signals=table, identity=identity
        ) as running:
            running.idp, running.signals_table = idp, table
            wait_until(lambda: streams(running).get("idp", {}).get("status") == "verified")
            yield running


def on_stream(bastion) -> list[dict]:
    stream = bastion.idp.stream("urn:ietf:rfc:8935")
    return bastion.idp.subjects.get(stream["stream_id"], [])


def sign_in(bastion, sub: str, username: str) -> None:
    """What a sign-in through the provider ``corp`` leaves behind: its account, linked."""
    bastion.app.state.signals.store.db.execute(
        "INSERT INTO identity_accounts (provider, subject, username, facts, last_login_at)"
        " VALUES (?, ?, ?, '[]', ?)",
        ("corp", sub, username, time.time()),
    )


def test_bastion_adds_its_users_and_their_events_come_while_no_other_subjects_do(bastion):
    wait_until(lambda: SAM in on_stream(bastion) and LEE in on_stream(bastion))
    event = bastion.idp.deliver(CAEP + "session-revoked", {}, SAM)
    assert event is not None
    wait_until(lambda: received(bastion, jti_of(event)) is not None)
    effect = received(bastion, jti_of(event)).detail["effects"][0]
    assert (effect["user"], effect["effect"]) == ("sam", "revoke")
    # A subject bastion did not add is not on the stream: the transmitter sends nothing of it.
    assert bastion.idp.deliver(CAEP + "session-revoked", {}, {"format": "email",
                                "email": "nobody@example.com"}) is None  # fmt: skip


def test_a_linked_account_is_added_on_sign_in_and_removed_when_unlinked(bastion):
    sign_in(bastion, "00u7", "dana")
    wait_until(lambda: account("00u7") in on_stream(bastion))
    event = bastion.idp.deliver(CAEP + "credential-change", {}, account("00u7"))
    wait_until(lambda: received(bastion, jti_of(event)) is not None)
    # The account's iss_sub names its user, though no users table lists it.
    assert received(bastion, jti_of(event)).detail["effects"][0]["user"] == "dana"
    release_account(bastion.app.state.signals.store.db, "dana", actor="test")
    wait_until(lambda: account("00u7") not in on_stream(bastion))
    assert ("remove", {"stream_id": bastion.idp.stream("urn:ietf:rfc:8935")["stream_id"],
                       "subject": account("00u7")}) in bastion.idp.subject_calls  # fmt: skip
    assert bastion.idp.deliver(CAEP + "credential-change", {}, account("00u7")) is None
    audit = bastion.app.state.oauth.audit
    # Recorded once the transmitter answered.
    wait_until(lambda: any(e.detail.get("subject_key") == f"iss_sub:{LOGIN_ISSUER}|00u7"
                           for e in audit.events("ssf.subject_removed")))  # fmt: skip


def test_a_subject_the_transmitter_refuses_is_reported_and_tried_again(bastion, tmp_path, capsys):
    wait_until(lambda: "not added" in (streams(bastion)["idp"]["subjects"] or ""))
    assert ROWAN not in on_stream(bastion)
    # Beside the stream's status, shown to anyone (/readyz): counts and bastion's words only.
    shown = bastion.http.get(f"{bastion.url}/readyz").json()["ssf_streams"]["idp"]["subjects"]
    assert "1 not added (add answered HTTP 403)" in shown and "rowan" not in shown, shown
    config = tmp_path / "bastion.toml"
    ssf = bastion.signals_table["ssf"]
    config.write_text(
        f"[server]\ndatabase = {json.dumps(bastion.app.state.config.database)}\n"
        f"[oauth]\nissuer = {json.dumps(bastion.url)}\n"
        f'[identity]\nlocal_passwords = true\nproviders = [{{id = "corp", issuer ='
        f' {json.dumps(LOGIN_ISSUER)}, client_id = "bastion",'
        f' client_secret = "not-used-by-these-tests"}}]\n'
        f"[signals.ssf]\ntransmitters = {_toml(ssf['transmitters'])}\n"
    )
    code = main(["signals", "subjects", "status", "--config", str(config), "--json"])
    rows = {r["subject_key"]: r for r in map(json.loads, capsys.readouterr().out.splitlines())}
    assert code == 1  # one subject is not on the stream
    assert rows["email:rowan@example.com"]["state"] == "add_failed"
    assert rows["email:rowan@example.com"]["detail"] == "add answered HTTP 403"
    assert rows["email:sam@example.com"]["state"] == "added"
    del bastion.idp.subject_answers[bastion.idp.subject_key(ROWAN)]
    code = main(["signals", "subjects", "sync", "--config", str(config)])
    assert code == 0, capsys.readouterr()
    assert ROWAN in on_stream(bastion)


def test_a_removal_the_transmitter_refuses_keeps_the_subject_and_is_tried_again(bastion):
    sign_in(bastion, "00u9", "kai")
    wait_until(lambda: account("00u9") in on_stream(bastion))
    key = bastion.idp.subject_key(account("00u9"))
    bastion.idp.subject_answers[key] = 500
    release_account(bastion.app.state.signals.store.db, "kai", actor="test")
    removals = lambda: [c for c in bastion.idp.subject_calls  # noqa: E731
                        if c[0] == "remove" and c[1]["subject"] == account("00u9")]  # fmt: skip
    wait_until(lambda: len(removals()) >= 2)  # tried again
    rows = bastion.app.state.signals.store.subjects("idp")
    assert rows[f"iss_sub:{LOGIN_ISSUER}|00u9"].state == "remove_failed"
    wait_until(lambda: "not removed" in streams(bastion)["idp"]["subjects"])
    del bastion.idp.subject_answers[key]
    wait_until(lambda: account("00u9") not in on_stream(bastion))
    wait_until(
        lambda: (
            f"iss_sub:{LOGIN_ISSUER}|00u9" not in bastion.app.state.signals.store.subjects("idp")
        )
    )
