"""A stream's subjects (SSF 1.0 §8.1.3) changed at the moment an account is linked or unlinked,
not at the next round: a real bastion on PostgreSQL, a person signing in through a real OpenID
provider (test_oidc_login_refusals.py's, over HTTP), and two real transmitters that send events
only about the subjects added to the stream. Transmitter ``now`` has its rounds an hour apart (so
a subject on it after start was put there by the sign-in or the unlink itself); ``rounds`` has
them 0.2 s apart (the backstop: it adds what a sign-in could not). A second bastion on the same
database shows that one process does a round at a time: each change is asked of the transmitter
and audited once."""

from __future__ import annotations

import json
import os
import threading
import time

import pytest

from bastion.cli import main
from bastion.identity.accounts import release_account
from bastion.server.app import create_app
from tests.conftest import postgres_schema
from tests.identity.oidc_support import Person
from tests.identity.test_oidc_login_refusals import SECRETS, TestProvider
from tests.oauth.support import Bastion, free_socket, serve

from .test_ssf import _toml, streams, wait_until
from .transmitter import BEARER, Transmitter

AUDIENCE = "https://bastion.test/ssf-now"
PUSH_TOKENS = {"now": "push-credential-of-now", "rounds": "push-credential-of-rounds"}
ISSUER_NAME = "b"  # the test provider's issuer that does not send RFC 9207 iss


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from tests.gateway.support import start

    os.environ["BASTION_TEST_NOW_BEARER"] = BEARER
    for name, token in PUSH_TOKENS.items():
        os.environ[f"BASTION_TEST_{name.upper()}_PUSH"] = token
    idp = TestProvider()
    transmitters = {name: Transmitter(AUDIENCE) for name in PUSH_TOKENS}
    for t in transmitters.values():
        t.default_subjects = "NONE"
        t.subject_endpoints = True
        t.one_stream = True
    with (
        serve(idp.app, free_socket()) as idp_url,
        serve(transmitters["now"].app(), free_socket()) as now_url,
        serve(transmitters["rounds"].app(), free_socket()) as rounds_url,
        postgres_schema() as database,
    ):
        idp.url = idp_url
        transmitters["now"].url, transmitters["rounds"].url = now_url, rounds_url
        table = {
            "ssf": {
                "transmitters": [
                    {
                        "name": name,
                        "issuer": transmitters[name].url,
                        "audience": AUDIENCE,
                        "delivery": "push",
                        "bearer_env": "BASTION_TEST_NOW_BEARER",
                        "push_token_env": f"BASTION_TEST_{name.upper()}_PUSH",
                        "users": {"email:sam@example.com": "sam"},
                        "linked_accounts": "corp",
                        "subjects_sync_seconds": 3600 if name == "now" else 0.2,
                    }
                    for name in PUSH_TOKENS
                ]
            }
        }
        identity = {
            "local_passwords": True,
            "providers": [
                {
                    "id": "corp",
                    "issuer": idp.issuer(ISSUER_NAME),
                    "client_id": f"bastion-{ISSUER_NAME}",
                    "client_secret": SECRETS[f"bastion-{ISSUER_NAME}"],
                }
            ],
        }
        with start(
            tmp_path_factory.mktemp("subjects-now"),
            signals=table,
            identity=identity,
            database=database,
        ) as running:
            running.idp, running.transmitters = idp, transmitters
            running.signals_table, running.identity_table = table, identity
            # Configured, verified, and the round at start done (its summary recorded): the
            # next round of "now" is an hour away.
            wait_until(
                lambda: (
                    all(
                        s.get("status") == "verified" and s.get("subjects")
                        for s in streams(running).values()
                    )
                    and len(streams(running)) == 2
                )
            )
            yield running


def account(world, sub: str) -> dict:
    return {"format": "iss_sub", "iss": world.idp.issuer(ISSUER_NAME), "sub": sub}


def key_of(world, sub: str) -> str:
    return f"iss_sub:{world.idp.issuer(ISSUER_NAME)}|{sub}"


def on_stream(world, name: str) -> list[dict]:
    t = world.transmitters[name]
    return t.subjects.get(t.stream("urn:ietf:rfc:8935")["stream_id"], [])


def calls(world, name: str, sub: str, action: str) -> list[dict]:
    return [
        body
        for done, body in world.transmitters[name].subject_calls
        if done == action and body.get("subject") == account(world, sub)
    ]


def audited(world, event: str, sub: str) -> list:
    return [
        e
        for e in world.app.state.oauth.audit.events(event)
        if e.detail.get("subject_key") == key_of(world, sub)
    ]


def sign_in(world, sub: str):
    """A person signs in through provider ``corp`` as account ``sub`` (over HTTP: bastion's
    authorization endpoint, the provider, bastion's callback); bastion's answer at the
    callback."""
    bastion = Bastion(
        world.app.state.oauth, world.url, world.mcp_url("desk"), "http://127.0.0.1:9/other",
        None, world.http,
    )  # fmt: skip
    person = Person(bastion)
    try:
        query = person.sent_to_provider(bastion.register(), "corp", scope="customers:read")
        code = world.idp.issue(ISSUER_NAME, query, sub=sub)
        return person.back_from_provider("corp", code=code, state=query["state"])
    finally:
        person.close()


def signed_in(answer) -> bool:
    return answer.status_code == 200 and "Allow access?" in answer.text


def test_a_sign_in_adds_the_account_at_once_not_at_the_next_round(world):
    assert account(world, "00a1") not in on_stream(world, "now")
    assert signed_in(sign_in(world, "00a1"))
    # The rounds of "now" are an hour apart and its first was done before: the sign-in added it.
    wait_until(lambda: account(world, "00a1") in on_stream(world, "now"))
    assert calls(world, "now", "00a1", "add") == [
        {
            "stream_id": world.transmitters["now"].stream("urn:ietf:rfc:8935")["stream_id"],
            "subject": account(world, "00a1"),
            "verified": True,
        }
    ]
    wait_until(lambda: len(audited(world, "ssf.subject_added", "00a1")) == 2)  # both streams
    assert {e.detail["transmitter"] for e in audited(world, "ssf.subject_added", "00a1")} == {
        "now",
        "rounds",
    }


def test_unlinking_removes_the_account_at_the_transmitter_at_once(world, tmp_path, capsys):
    assert signed_in(sign_in(world, "00a2"))
    wait_until(lambda: account(world, "00a2") in on_stream(world, "now"))
    config = tmp_path / "bastion.toml"
    provider = world.identity_table["providers"][0]
    config.write_text(
        f"[server]\ndatabase = {json.dumps(world.app.state.config.database)}\n"
        f"[oauth]\nissuer = {json.dumps(world.url)}\n"
        f"[identity]\nlocal_passwords = true\nproviders = [{_toml(provider)}]\n"
        f"[signals.ssf]\ntransmitters = {_toml(world.signals_table['ssf']['transmitters'])}\n"
    )
    assert main(["users", "unlink", "corp:00a2", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    # Gone when the command returns: not left for a round (an hour away on "now").
    assert account(world, "00a2") not in on_stream(world, "now"), out
    assert len(calls(world, "now", "00a2", "remove")) == 1
    assert "removed from the stream of now" in out, out
    assert key_of(world, "00a2") not in world.app.state.signals.store.subjects("now")
    assert [e.detail["actor"] for e in audited(world, "ssf.subject_removed", "00a2")
            if e.detail["transmitter"] == "now"] == [e.detail["actor"] for e in  # fmt: skip
            world.app.state.oauth.audit.events("user.unlinked")
            if e.subject == "corp:00a2"]  # fmt: skip


def test_a_sign_in_while_the_transmitter_refuses_succeeds_and_a_round_adds_it_later(world):
    subject = world.transmitters["rounds"].subject_key(account(world, "00a3"))
    world.transmitters["rounds"].subject_answers[subject] = 503
    try:
        assert signed_in(sign_in(world, "00a3"))
        wait_until(lambda: account(world, "00a3") in on_stream(world, "now"))
        wait_until(
            lambda: (row := world.app.state.signals.store.subjects("rounds").get(
                key_of(world, "00a3"))) is not None and row.state == "add_failed"
        )  # fmt: skip
        assert account(world, "00a3") not in on_stream(world, "rounds")
    finally:
        del world.transmitters["rounds"].subject_answers[subject]
    wait_until(lambda: account(world, "00a3") in on_stream(world, "rounds"))


def test_two_replicas_on_one_database_ask_and_audit_each_change_once(world):
    db = world.app.state.signals.store.db
    second = create_app(world.app.state.config)
    with serve(second, free_socket()):
        receivers = [world.app.state.signals, second.state.signals]
        wait_until(lambda: second.state.signals.rounds.get("rounds", 0) >= 1)
        hold = threading.Event()
        subject = world.transmitters["rounds"].subject_key(account(world, "00a4"))
        world.transmitters["rounds"].subject_holds[subject] = hold
        try:
            # Linked without a sign-in (as an ID-JAG's first use links it): rounds alone add it.
            db.execute(
                "INSERT INTO identity_accounts (provider, subject, username, facts,"
                " last_login_at) VALUES (?, ?, ?, '[]', ?)",
                ("corp", "00a4", "corp:00a4", time.time()),
            )
            wait_until(lambda: calls(world, "rounds", "00a4", "add"))
            # The add is held at the transmitter. A process that did not make it goes through
            # two more rounds meanwhile (the one that made it is held in its own).
            before = [r.rounds["rounds"] for r in receivers]
            wait_until(
                lambda: any(
                    r.rounds["rounds"] >= b + 2 for r, b in zip(receivers, before, strict=True)
                )
            )
        finally:
            hold.set()
        wait_until(lambda: account(world, "00a4") in on_stream(world, "rounds"))
        wait_until(
            lambda: (row := world.app.state.signals.store.subjects("rounds").get(
                key_of(world, "00a4"))) is not None and row.state == "added"
        )  # fmt: skip
        assert len(calls(world, "rounds", "00a4", "add")) == 1
        assert len([e for e in audited(world, "ssf.subject_added", "00a4")
                    if e.detail["transmitter"] == "rounds"]) == 1  # fmt: skip
        release_account(db, "corp:00a4", actor="test")
        wait_until(lambda: key_of(world, "00a4") not in world.app.state.signals.store.subjects(
            "rounds"))  # fmt: skip
        assert account(world, "00a4") not in on_stream(world, "rounds")
        assert len(calls(world, "rounds", "00a4", "remove")) == 1
        assert len([e for e in audited(world, "ssf.subject_removed", "00a4")
                    if e.detail["transmitter"] == "rounds"]) == 1  # fmt: skip
