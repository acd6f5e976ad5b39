"""The receiver's parts on their own: the [signals.ssf] settings refuse what would weaken
verification, the JWKS (fetched by `bastion.oauth.jwks`) is fetched again on an unknown kid but no
more often than allowed, the
replay store works on SQLite and PostgreSQL, and user-wide revocation revokes every grant."""

from __future__ import annotations

import asyncio
import json
import logging
import time

import anyio
import pytest
from joserfc.jwk import ECKey, KeySet
from starlette.applications import Starlette
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from bastion.audit import AuditLog
from bastion.db import Database
from bastion.oauth.store import USERS_CHANGED, Grant, OAuthStore
from bastion.policy.parser import parse_fact
from bastion.server.app import create_app
from bastion.server.config import ConfigError, ServerConfig
from bastion.signals.set_tokens import SetRefused
from bastion.signals.settings import SignalsConfigError, SsfSettings, from_config
from bastion.signals.ssf_store import SsfStore
from bastion.signals.subjects import SubjectError, UnreadFormat, parse_subject, user_of
from tests.oauth.support import free_socket, serve, signed_text
from tests.relays import Relay
from tests.waits import PATIENCE

ISSUER = "https://idp.example.com/tenant"
SSF_LOG = "bastion.signals.ssf"
ENV = {"PUSH": "p" * 32, "BEARER": "b" * 32, "SHORT": "short"}


def transmitter(**changes) -> dict:
    return {
        "name": "idp",
        "issuer": "https://idp.example.com/tenant",
        "audience": "https://bastion.example.com",
        "delivery": "push",
        "push_token_env": "PUSH",
        "bearer_env": "BEARER",
        **changes,
    }


def settings(table: dict | None = None, **changes) -> SsfSettings:
    table = {"transmitters": [transmitter(**changes)], **(table or {})}
    return SsfSettings.from_table(table, issuer="https://bastion.example.com", env=ENV)


def test_defaults_and_the_derived_configuration_url():
    s = settings()
    t = s.transmitters[0]
    assert (t.metadata_cache_seconds, t.metadata_stale_seconds) == (3600, 86400)
    assert settings(metadata_stale_seconds=0).transmitters[0].metadata_stale_seconds == 0
    assert t.configuration_url == "https://idp.example.com/.well-known/ssf-configuration/tenant"
    assert s.push_url == "https://bastion.example.com/ssf/events"
    assert "HS256" not in s.algorithms and "none" not in s.algorithms
    assert t.effect("https://schemas.openid.net/secevent/caep/event-type/session-revoked") == (
        "revoke"
    )
    assert t.effect("https://example.com/unknown") == "record"


@pytest.mark.parametrize(
    "table, changes, message",
    [
        ({"algorithms": ["HS256"]}, {}, "public keys only"),
        ({"algorithms": ["none"]}, {}, "public keys only"),
        ({}, {"push_token_env": None}, "push_token_env"),
        ({}, {"push_token_env": "SHORT"}, "16 characters"),
        ({}, {"push_token_env": "MISSING"}, "16 characters"),
        ({}, {"issuer": "http://idp.example.com"}, "https"),
        ({}, {"delivery": "carrier-pigeon"}, "push or poll"),
        ({}, {"users": {"sam": "sam"}}, "must start with"),
        ({}, {"effects": {"x": "explode"}}, "use one of"),
        ({}, {"effects": {"https://example.com/x": "fact"}}, "become facts"),
        ({}, {"linked_accounts": "corp"}, "linked_accounts must name an"),
        ({}, {"subjects_sync_seconds": 0}, "positive"),
        ({"jti_retention_seconds": 10, "max_event_age_seconds": 60}, {}, "at least"),
        ({"jti_retention_seconds": 3600, "max_event_age_seconds": 3600}, {}, "clock_skew"),
        ({"max_body_bytes": 0}, {}, "positive"),
        ({"surprise": 1}, {}, "unknown key"),
        ({}, {"surprise": 1}, "unknown key"),
        ({}, {"fact_expiry_seconds": -5}, "positive"),
        ({}, {"fact_expiry_seconds": float("inf")}, "positive"),
        ({}, {"devices": "yes"}, "true or false"),
        ({}, {"metadata_cache_seconds": 0}, "metadata_cache_seconds must be a positive"),
        ({}, {"metadata_cache_seconds": True}, "metadata_cache_seconds must be a positive"),
        ({}, {"metadata_stale_seconds": -1}, "metadata_stale_seconds must be 0 or a positive"),
        ({}, {"metadata_stale_seconds": "1h"}, "metadata_stale_seconds must be 0 or a positive"),
        ({}, {"metadata_stale_seconds": float("nan")}, "metadata_stale_seconds must be 0 or"),
    ],
)
def test_settings_that_would_weaken_verification_are_refused(table, changes, message):
    with pytest.raises(SignalsConfigError, match=message):
        settings(table, **{k: v for k, v in changes.items()})


def test_linked_accounts_of_a_provider_with_tenants_are_refused_at_start(tmp_path, monkeypatch):
    """A multi-tenant login provider's accounts are (tenant, sub), each tenant its own issuer:
    no one ``iss_sub`` subject names them, so they are not linked (not built)."""
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    provider = {
        "id": "entra",
        "issuer": "https://login.microsoftonline.com/organizations/v2.0",
        "client_id": "c",
        "client_secret": "s3cr3t-value",
    }
    for tenants, refused in (({}, False), ({"tenants": ["t1"]}, True)):
        config = ServerConfig(
            database=str(tmp_path / "b.db"),
            identity={"providers": [{**provider, **tenants}]},
            signals={"ssf": {"transmitters": [transmitter(linked_accounts="entra")]}},
        )
        if not refused:
            from_config(config, "https://bastion.example.com")
            continue
        with pytest.raises(ConfigError, match="cannot name entra, a provider with tenants"):
            from_config(config, "https://bastion.example.com")


def test_a_signals_table_without_oauth_is_refused_at_start(tmp_path):
    config = ServerConfig(
        database=str(tmp_path / "b.db"), signals={"ssf": {"transmitters": [transmitter()]}}
    )
    with pytest.raises(ConfigError, match=r"\[oauth\]"):
        create_app(config)


def test_the_signals_table_is_read_from_bastion_toml(tmp_path):
    path = tmp_path / "bastion.toml"
    path.write_text(
        '[signals.ssf]\nmax_body_bytes = 1024\n[[signals.ssf.transmitters]]\nname = "idp"\n'
    )
    config = ServerConfig.load(path, env={})
    assert config.signals["ssf"]["transmitters"][0]["name"] == "idp"


def test_subjects_of_every_format():
    assert parse_subject({"format": "email", "email": "Sam@Example.COM"}).user_keys == (
        "email:sam@example.com",
    )
    assert parse_subject({"format": "iss_sub", "iss": "https://i", "sub": "1"}).user_keys == (
        "iss_sub:https://i|1",
    )
    assert parse_subject({"format": "opaque", "id": "x"}).user_keys == ("opaque:x",)
    complex_ = parse_subject(
        {
            "format": "complex",
            "user": {"format": "email", "email": "a@b.c"},
            "device": {"format": "opaque", "id": "d1"},
            "session": {"format": "opaque", "id": "s1"},
        }
    )
    assert (complex_.user_keys, complex_.device, complex_.session) == (("email:a@b.c",), "d1", "s1")
    # RFC 9493 §3.2: every simple format it defines names a user through the users table.
    for sub, key in (
        ({"format": "phone_number", "phone_number": "+12025550123"}, "phone_number:+12025550123"),
        ({"format": "account", "uri": "acct:sam@example.com"}, "account:acct:sam@example.com"),
        ({"format": "did", "url": "did:example:123"}, "did:did:example:123"),
        ({"format": "uri", "uri": "https://u.example/sam"}, "uri:https://u.example/sam"),
    ):
        assert parse_subject(sub).user_keys == (key,)
        assert user_of(parse_subject(sub), settings(users={key: "sam"}).transmitters[0].users)
    for bad in ({"format": "phone_number"}, {"format": "email"}, "x", {"format": "x-other"},
                {"format": "complex"}, {"format": "opaque", "id": "x" * 600}):  # fmt: skip
        with pytest.raises(SubjectError):
            parse_subject(bad)


@pytest.mark.parametrize("fmt", [["email"], {"email": 1}, 7, None, True])
def test_a_format_that_is_not_a_string_is_one_not_read_never_a_failure(fmt):
    """A format that is a list or an object was looked up in the formats' table, and Python
    cannot look one up: TypeError, a 500 for the push and the SET lost (tests/security/
    test_hostile_sets.py found it). It is a format not read, alone or as a complex subject's
    member, and passed over among aliases, as any other format not read."""
    for sub in ({"format": fmt, "email": "sam@example.com"}, {"subject_type": fmt}):
        with pytest.raises(UnreadFormat):
            parse_subject(sub)
    with pytest.raises(SubjectError, match="needs a user or a device member read here"):
        parse_subject({"format": "complex", "user": {"format": fmt, "email": "sam@example.com"}})
    aliases = {
        "format": "aliases",
        "identifiers": [{"format": fmt}, {"format": "opaque", "id": "x"}],
    }
    assert parse_subject(aliases).user_keys == ("opaque:x",)
    complex_ = {
        "format": "complex",
        "device": {"format": fmt},
        "user": {"format": "opaque", "id": "x"},
    }
    assert parse_subject(complex_).unread == ("device",)


@pytest.fixture
def published_keys():
    """A transmitter's metadata and JWKS over real HTTP: ``keys`` is what the JWKS publishes,
    ``fetches`` counts its fetches."""
    state = {"keys": [], "fetches": 0, "url": "", "metadata_fetches": 0, "metadata_status": 200}

    async def metadata(request):
        state["metadata_fetches"] += 1
        if state["metadata_status"] != 200:
            return JSONResponse({}, state["metadata_status"])
        return JSONResponse({"issuer": ISSUER, "jwks_uri": f"{state['url']}/jwks"})

    async def jwks(request):
        state["fetches"] += 1
        return JSONResponse({"keys": state["keys"]})

    app = Starlette(
        routes=[Route("/.well-known/ssf-configuration", metadata), Route("/jwks", jwks)]
    )
    with serve(app, free_socket()) as url:
        state["url"] = url
        yield state


def receiver_of(published_keys, tmp_path, clock=time.time, **table):
    from bastion.facts.store import FactStore
    from bastion.signals.ssf import SsfReceiver

    s = settings(
        table,
        issuer=ISSUER,
        configuration_url=f"{published_keys['url']}/.well-known/ssf-configuration",
    )
    db = Database(str(tmp_path / "b.db"))
    receiver = SsfReceiver(s, db, OAuthStore(db), FactStore(db), lambda: None, clock=clock)
    return receiver, s.transmitters[0], db


def set_with_kid(kid: str) -> str:
    from tests.signals.transmitter import CAEP, Transmitter

    sender = Transmitter("https://bastion.example.com")
    sender.url = ISSUER
    return sender.set_token(CAEP + "session-revoked", {}, {"format": "opaque", "id": "x"},
                            header={"kid": kid})  # fmt: skip


def test_an_unknown_kid_refetches_the_jwks_but_not_more_often_than_allowed(
    published_keys, tmp_path
):
    old, new = (ECKey.generate_key("P-256", parameters={"kid": k}) for k in ("old", "new"))
    published_keys["keys"] = [old.as_dict(private=False)]
    receiver, t, db = receiver_of(published_keys, tmp_path, jwks_refresh_seconds=60)
    now = [1000.0]
    receiver.key_sets[t.name].clock = lambda: now[0]
    try:
        assert anyio.run(receiver.keys, t, set_with_kid("old")).get_by_kid("old")
        published_keys["keys"].append(new.as_dict(private=False))  # the transmitter rotates
        # Within jwks_refresh_seconds of the last fetch, a kid the cached set lacks is refused
        # without a fetch: a stream of made-up kids is not a stream of fetches.
        for kid in ("new", "forged"):
            with pytest.raises(SetRefused) as refused:
                verify_set_with(receiver, t, set_with_kid(kid))
            assert refused.value.err == "invalid_key"
        assert published_keys["fetches"] == 1
        now[0] += 61  # past jwks_refresh_seconds: the rotation is fetched
        assert anyio.run(receiver.keys, t, set_with_kid("new")).get_by_kid("new")
        assert published_keys["fetches"] == 2
    finally:
        db.close()


def verify_set_with(receiver, t, token: str):
    keys = anyio.run(receiver.keys, t, token)
    return receiver.receive(t, token, keys)


def test_a_signed_set_holding_text_that_is_not_unicode_is_refused(published_keys, tmp_path):
    """Signed by the transmitter and still refused, before its subject reaches a fact write:
    half of a surrogate pair, which no database stores."""
    from tests.signals.transmitter import CAEP, Transmitter

    sender = Transmitter("https://bastion.example.com")
    sender.url = ISSUER
    published_keys["keys"] = [sender.key.as_dict(private=False)]
    receiver, t, db = receiver_of(published_keys, tmp_path)
    try:
        token = sender.set_token(CAEP + "session-revoked", {}, {"format": "opaque", "id": "\udc00"})
        with pytest.raises(SetRefused, match="half of a UTF-16 surrogate pair") as refused:
            verify_set_with(receiver, t, token)
        assert refused.value.err == "invalid_request"
    finally:
        db.close()


@pytest.mark.parametrize("where", ["claims", "header"])
def test_a_signed_set_that_names_a_member_twice_is_refused(published_keys, tmp_path, where):
    """A SET whose ``events`` (or header ``typ``) is given twice, signed by the transmitter: a
    reader that keeps the first value sees a credential change, one that keeps the last a
    revoked session. Refused as it is read (RFC 7515 §5.2, RFC 7519 §4), naming the member,
    with RFC 8935's invalid_request, before any event takes effect."""
    from tests.signals.transmitter import CAEP, Transmitter

    sender = Transmitter("https://bastion.example.com")
    sender.url = ISSUER
    published_keys["keys"] = [sender.key.as_dict(private=False)]
    receiver, t, db = receiver_of(published_keys, tmp_path)
    try:
        claims = json.dumps(
            {
                "iss": ISSUER,
                "aud": "https://bastion.example.com",
                "iat": int(time.time()),
                "jti": "j-twice",
                "events": {CAEP + "credential-change": {"change_type": "update"}},
                "sub_id": {"format": "opaque", "id": "x"},
            }
        )
        header = '{"alg": "ES256", "typ": "secevent+jwt", "kid": "k1"}'
        if where == "claims":
            member = "events"
            claims = claims[:-1] + f', "events": {{"{CAEP}session-revoked": {{}}}}}}'
        else:
            member = "typ"
            header = '{"alg": "ES256", "typ": "JWT", "kid": "k1", "typ": "secevent+jwt"}'
        token = signed_text(sender.key, header, claims)
        with pytest.raises(SetRefused, match=f"'{member}' twice") as refused:
            verify_set_with(receiver, t, token)
        assert refused.value.err == "invalid_request"
    finally:
        db.close()


def test_a_set_whose_kid_is_not_a_string_is_refused(published_keys, tmp_path):
    from tests.signals.transmitter import CAEP, Transmitter

    sender = Transmitter("https://bastion.example.com")
    sender.url = ISSUER
    published_keys["keys"] = [sender.key.as_dict(private=False)]
    receiver, t, db = receiver_of(published_keys, tmp_path)
    event, subject = CAEP + "session-revoked", {"format": "opaque", "id": "x"}
    token = sender.set_token(event, {}, subject, header={"kid": ["k1"]})
    try:
        # Before its key set is looked for...
        with pytest.raises(SetRefused, match="kid must be a string") as refused:
            anyio.run(receiver.keys, t, token)
        assert refused.value.err == "invalid_request"
        assert published_keys["fetches"] == 0
        # ... and when verified, with the key set that holds its key.
        keys = anyio.run(receiver.keys, t, sender.set_token(event, {}, subject))
        with pytest.raises(SetRefused, match="kid must be a string") as refused:
            receiver.receive(t, token, keys)
        assert refused.value.err == "invalid_request"
    finally:
        db.close()


def test_a_jwks_with_too_many_keys_or_secret_keys_is_not_used(published_keys, tmp_path):
    many = [ECKey.generate_key("P-256", parameters={"kid": str(i)}) for i in range(3)]
    published_keys["keys"] = [k.as_dict(private=False) for k in many]
    receiver, t, db = receiver_of(published_keys, tmp_path, jwks_max_keys=2)
    try:
        with pytest.raises(SetRefused, match="jwks must hold 1 to 2 keys"):
            anyio.run(receiver.keys, t, set_with_kid("0"))
    finally:
        db.close()
    # A setting above the 20 keys of a client's key set is the transmitter's bound.
    many = [ECKey.generate_key("P-256", parameters={"kid": str(i)}) for i in range(25)]
    published_keys["keys"] = [k.as_dict(private=False) for k in many]
    receiver, t, db = receiver_of(published_keys, tmp_path, jwks_max_keys=30)
    try:
        assert anyio.run(receiver.keys, t, set_with_kid("24"))
    finally:
        db.close()
    published_keys["keys"] = [{"kty": "oct", "k": "c2VjcmV0", "kid": "s"}]
    receiver, t, db = receiver_of(published_keys, tmp_path)
    try:
        with pytest.raises(SetRefused, match="no shared secrets"):
            anyio.run(receiver.keys, t, set_with_kid("s"))
    finally:
        db.close()


def test_a_jti_is_claimed_once_on_each_database(database_url):
    db = Database(database_url)
    try:
        store = SsfStore(db)
        assert store.claim("https://idp", "j1", time.time())
        assert not store.claim("https://idp", "j1", time.time())
        assert store.claim("https://other", "j1", time.time())  # jtis are per issuer
        with pytest.raises(Killed), db.transaction():  # a claim is kept only with its effects
            assert store.claim("https://idp", "j2", time.time())
            raise Killed
        assert store.claim("https://idp", "j2", time.time())
        assert store.forget_before(time.time() + 1) == 3
    finally:
        db.close()


def test_a_value_is_taken_only_by_an_event_no_older_than_the_one_in_force_on_each_database(
    database_url,
):
    db = Database(database_url)
    try:
        store = SsfStore(db)
        value = ("device_compliance", parse_fact('x(User{"sam"})')[1])
        assert store.take_value(value, 100.0)
        assert not store.take_value(value, 99.0)  # older: the value in force stays
        assert store.take_value(value, 100.0)  # as new: taken, as before
        assert store.take_value(("device_compliance", parse_fact('x(Device{"sam"})')[1]), 50.0)
        with pytest.raises(Killed), db.transaction():  # kept only with the SET's effects
            assert store.take_value(value, 200.0)
            raise Killed
        assert store.take_value(value, 150.0)
    finally:
        db.close()


def test_a_set_dated_ahead_is_stale_before_its_jti_can_be_forgotten(database_url):
    """A SET may be dated up to clock_skew_seconds ahead, so it stays fresh that much longer than
    max_event_age_seconds after it is received: the shortest retention the settings allow must
    still hold its jti until it is stale, or its replay is taken as new."""
    from bastion.signals.set_tokens import verify_set
    from tests.signals.transmitter import CAEP, Transmitter

    table = {"max_event_age_seconds": 3600, "clock_skew_seconds": 60}
    s = settings(table)

    def accepted(retention: int) -> bool:
        try:
            settings({**table, "jti_retention_seconds": retention})
        except SignalsConfigError:
            return False
        return True

    shortest = next(r for r in range(3600, 3600 + 61) if accepted(r))
    sender = Transmitter("https://bastion.example.com")
    sender.url = ISSUER
    received = 1_000_000.0
    token = sender.set_token(CAEP + "session-revoked", iat=int(received + s.clock_skew_seconds))
    keys = KeySet([sender.key])
    check = {
        "keys": keys,
        "issuer": ISSUER,
        "audience": "https://bastion.example.com",
        "algorithms": s.algorithms,
        "clock_skew_seconds": s.clock_skew_seconds,
        "max_age_seconds": s.max_event_age_seconds,
    }
    db = Database(database_url)
    try:
        store = SsfStore(db)
        jti = verify_set(token, now=received, **check).jti
        assert store.claim(ISSUER, jti, received)
        later = received + shortest + 1  # the jti may be forgotten now (the retention task)
        assert store.forget_before(later - shortest) == 1
        with pytest.raises(SetRefused, match="stale"):
            verify_set(token, now=later, **check)
    finally:
        db.close()


def test_revoking_a_user_revokes_each_of_their_grants_and_announces_each(database_url):
    db = Database(database_url)
    try:
        store = OAuthStore(db)
        now = time.time()
        for username in ("sam", "kim"):
            store.create_user(username, "x", now, actor="test")
        heard = []
        store.on_revoked(heard.append)
        for i, username in enumerate(("sam", "sam", "kim")):
            store.create_grant(_grant(f"g{i}", username, now))
        assert store.revoke_user_grants("sam", now, "test", actor="test") == 2
        # Each grant, and the user's standing (a trusted issuer's tokens rest on no grant).
        assert sorted(heard) == sorted(["g0", "g1", USERS_CHANGED])
        assert store.grant("g2").revoked_at is None
        assert store.revoke_user_grants("sam", now, "test", actor="test") == 0
    finally:
        db.close()


def _grant(grant_id: str, username: str, now: float) -> Grant:
    return Grant(grant_id, "c", username, "https://r", "s", now, now + 3600, None)


class Killed(BaseException):  # noqa: N818 - stands for SIGKILL, not an error
    """The process killed at this point: no handler of bastion's runs (it is no `Exception`),
    and what its open transaction wrote is gone with its connection."""


def killed(*args, **kwargs):
    raise Killed


@pytest.mark.parametrize("step", ["effects", "record"])
def test_a_set_killed_part_way_is_not_claimed_and_is_applied_when_delivered_again(
    database_url, monkeypatch, step
):
    """A SET's jti claim, its effects and its record are one transaction. Killed after the claim
    and before (or during) its effects, the jti stayed claimed (it was released only by a
    handler), and the transmitter's redelivery was refused as a replay: a revocation lost for
    good. Now nothing of it is kept, and the redelivery is applied, once."""
    from bastion.facts.store import FactStore
    from bastion.signals.ssf import Replayed, SsfReceiver
    from tests.signals.transmitter import CAEP, Transmitter

    idp = Transmitter("https://bastion.example.com")
    idp.url = "https://idp.example.com/tenant"
    s = settings(users={"email:sam@example.com": "sam"})
    db = Database(database_url)
    oauth = OAuthStore(db)
    oauth.create_user("sam", "x", time.time(), actor="test")
    oauth.create_grant(_grant("g1", "sam", time.time()))
    receiver = SsfReceiver(s, db, oauth, FactStore(db), lambda: None)
    keys = KeySet.import_key_set({"keys": [idp.key.as_dict(private=False)]})
    event = idp.set_token(
        CAEP + "session-revoked", {}, {"format": "email", "email": "sam@example.com"}
    )
    t = s.transmitters[0]
    try:
        if step == "effects":
            monkeypatch.setattr(receiver, "revoke_user", killed)
        else:  # the grant revoked, the record of the SET not yet written
            monkeypatch.setattr(receiver.audit, "record", killed)
        with pytest.raises(Killed):
            receiver.receive(t, event, keys)
        monkeypatch.undo()
        assert db.execute("SELECT COUNT(*) FROM ssf_received") == [(0,)]
        assert oauth.grant("g1").revoked_at is None
        assert receiver.audit.events("signal.received") == []
        assert receiver.audit.events("grant.revoked") == []  # with the revocation it records
        outcome = receiver.receive(t, event, keys)  # redelivered: applied now, once
        assert outcome.effects[0]["result"] == "revoked 1 grant(s)"
        assert oauth.grant("g1").revoked_at is not None
        with pytest.raises(Replayed):
            receiver.receive(t, event, keys)
        assert len(receiver.audit.events("signal.received")) == 1
        (revoked,) = receiver.audit.events("grant.revoked")
        assert (revoked.subject, revoked.detail["grant_id"]) == ("sam", "g1")
        assert revoked.detail["actor"] == f"ssf:{t.name}"
        assert revoked.detail["reason"] == f"ssf {t.name}: session-revoked"
        assert len(receiver.audit.events("signal.refused")) == 1
    finally:
        db.close()


def test_a_receiver_whose_stores_are_on_another_database_is_refused(tmp_path):
    """Its claims and effects could not be one transaction."""
    from bastion.facts.store import FactStore
    from bastion.signals.ssf import SsfReceiver

    db, other = Database(str(tmp_path / "b.db")), Database(str(tmp_path / "b.db"))
    try:
        for oauth, facts in (
            (OAuthStore(other), FactStore(db)),
            (OAuthStore(db), FactStore(other)),
        ):
            with pytest.raises(ValueError, match="share one Database"):
                SsfReceiver(settings(), db, oauth, facts, lambda: None)
    finally:
        db.close()
        other.close()


def streamed(database_url, stream, poll, polls: int) -> tuple[list[dict], dict]:
    """Serve a transmitter whose metadata names ``stream`` (its configuration endpoint, GET and
    POST) and whose streams are polled at ``poll``; run bastion's task for that stream until
    ``poll`` was called ``polls`` times. The statuses the stream was recorded with on the way,
    and the transmitter's counts (``creates``, ``polls``); the task must still be running."""
    from bastion.facts.store import FactStore
    from bastion.signals.ssf import SsfReceiver

    state = {"url": "", "creates": 0, "polls": 0, "made": False}

    async def metadata(request):
        return JSONResponse(
            {"issuer": ISSUER, "jwks_uri": f"{state['url']}/jwks",
             "configuration_endpoint": f"{state['url']}/stream"}
        )  # fmt: skip

    async def counted_stream(request):
        if request.method == "GET" and not request.query_params:
            # Its list of bastion's streams (SSF 1.0 §8.1.1.2): the one it made, once it has.
            return JSONResponse([json.loads(created(state).body)] if state["made"] else [])
        state["creates"] += 1
        return await stream(request, state)

    async def counted_poll(request):
        state["polls"] += 1
        return await poll(request, state)

    app = Starlette(
        routes=[
            Route("/.well-known/ssf-configuration", metadata),
            Route("/stream", counted_stream, methods=["GET", "POST"]),
            Route("/poll", counted_poll, methods=["POST"]),
        ]
    )
    db = Database(database_url)
    seen: list[dict] = []
    try:
        with serve(app, free_socket()) as url:
            state["url"] = url
            s = settings(
                delivery="poll",
                poll_interval_seconds=0.05,
                configuration_url=f"{url}/.well-known/ssf-configuration",
            )
            receiver = SsfReceiver(s, db, OAuthStore(db), FactStore(db), lambda: None)
            t = s.transmitters[0]
            # Each status as it was stored, read back by the write that stored it (sampled
            # every 10 ms before, a busy machine could miss one that stood for a moment).
            store = receiver.store
            for name in ("save_stream", "verified"):
                write = getattr(store, name)

                def noted(*args, write=write, **kwargs):
                    written = write(*args, **kwargs)
                    stored = store.stream(t.name)
                    if stored and stored.detail not in [x["detail"] for x in seen]:
                        seen.append({"status": stored.status, "detail": stored.detail})
                    return written

                setattr(store, name, noted)

            async def scenario():
                import httpx

                receiver._client = httpx.AsyncClient(timeout=10)
                task = asyncio.create_task(receiver._run(t))
                try:
                    with anyio.fail_after(PATIENCE):
                        while state["polls"] < polls:
                            await asyncio.sleep(0.01)
                    assert not task.done(), task
                finally:
                    task.cancel()
                    await receiver._client.aclose()

            anyio.run(scenario)
    finally:
        db.close()
    return seen, state


def created(state: dict) -> JSONResponse:
    """The stream a transmitter creates, polled at its /poll (listed from then on)."""
    state["made"] = True
    return JSONResponse(
        {"stream_id": "s1", "iss": ISSUER, "aud": "https://bastion.example.com",
         "delivery": {"method": "urn:ietf:rfc:8936", "endpoint_url": f"{state['url']}/poll"}}
    )  # fmt: skip


def test_a_transmitters_words_no_database_can_hold_are_recorded_and_its_stream_tried_again(
    database_url,
):
    """A transmitter whose answers hold what a database cannot store (a key that is half of a
    surrogate pair, quoted by the refusal of a number under it): the stream's status is recorded
    with it written as an escape, and the stream's task goes on (on PostgreSQL the status write
    failed inside the task's handler, and the task stopped for good: no signal came in after
    it). An error answer's body (here with a NUL byte) is not quoted at all, only its status."""

    async def stream(request, state):
        if state["creates"] <= 2:  # refused, with bytes no text column takes
            return Response(b"down \x00 for \xff maintenance", status_code=500)
        return created(state)

    async def poll(request, state):
        body = b'{"\\ud800": 1e999}' if state["polls"] <= 2 else b'{"sets": {}}'
        return Response(body, media_type="application/json")

    seen, state = streamed(database_url, stream, poll, polls=4)
    details = " | ".join(x["detail"] for x in seen)
    assert "stream not configured" in details and "HTTP 500" in details, seen
    assert "poll failed" in details and "\\ud800: 1e999 is too large" in details, seen
    assert all("\x00" not in x["detail"] and x["detail"].isprintable() for x in seen), seen
    assert state["creates"] == 3 and state["polls"] >= 4


def test_a_transmitters_error_answer_is_not_echoed_into_the_streams_status_or_the_log(
    sqlite_url, caplog
):
    """What a transmitter answers with an error is its own text, which may carry a secret or
    forge a log line (a line break, a terminal escape): the stream's status (shown by /readyz,
    which anyone may read) and the log say the status it answered, never its words."""
    hostile = (
        b"denied\n2026-01-01 00:00:00 ERROR bastion: forged line"
        b" \x1b[2J\x1b[31mtoken=sk-hostile-secret\x1b[0m"
    )

    async def stream(request, state):
        if state["creates"] <= 1:
            return Response(hostile, status_code=400, media_type="text/plain")
        return created(state)

    async def poll(request, state):
        return Response(b'{"sets": {}}', media_type="application/json")

    with caplog.at_level("INFO", logger="bastion"):
        seen, state = streamed(sqlite_url, stream, poll, polls=1)
    refused = [x["detail"] for x in seen if "stream not configured" in x["detail"]]
    assert refused and all("answered HTTP 400" in d for d in refused), seen
    logged = [r.getMessage() for r in caplog.records if "stream not configured" in r.getMessage()]
    assert logged, caplog.records
    for said in refused + logged:
        for echoed in ("denied", "forged", "\x1b", "\n", "sk-hostile-secret"):
            assert echoed not in said, said


def test_a_transmitter_that_keeps_failing_is_logged_once_not_at_every_attempt(sqlite_url, caplog):
    """A stream that cannot be configured is tried again every ``poll_interval_seconds``, and a
    poll that fails at the next one: each was logged at ERROR at every attempt for as long as
    the transmitter failed. Now once, then once that it works again; the attempts between at
    DEBUG. The stream's status still says each failure (and that the poll answers again)."""

    async def stream(request, state):
        if state["creates"] <= 6:
            return Response(b"down", status_code=503)
        return created(state)

    async def poll(request, state):
        if state["polls"] <= 6:
            return Response(b"down", status_code=503)
        return Response(b'{"sets": {}}', media_type="application/json")

    caplog.set_level(logging.DEBUG, logger=SSF_LOG)
    seen, state = streamed(sqlite_url, stream, poll, polls=8)

    def said(about: str, level: int = logging.DEBUG) -> list[str]:
        return [
            r.getMessage()
            for r in caplog.records
            if r.name == SSF_LOG and r.levelno >= level and about in r.getMessage()
        ]

    assert len(said("stream not configured")) == 6 and len(said("poll failed")) == 6
    loud = said("ssf transmitter idp", logging.WARNING)
    assert [line.split(": ", 1)[1][:21] for line in loud] == [
        "stream not configured",
        "stream configured aga",
        "poll failed: http://1",
        "poll answered again",
    ], loud
    details = [x["detail"] for x in seen]
    assert any("poll failed" in d for d in details) and "poll answered again" in details, seen


def metadata_only() -> Starlette:
    """A transmitter that serves its metadata alone, naming endpoints that refuse connections."""

    async def metadata(request):
        return JSONResponse(
            {"issuer": ISSUER, "jwks_uri": "http://127.0.0.1:9/jwks",
             "configuration_endpoint": "http://127.0.0.1:9/stream"}
        )  # fmt: skip

    return Starlette(routes=[Route("/.well-known/ssf-configuration", metadata)])


@pytest.mark.parametrize("cause", ["round", "database"])
def test_a_subjects_round_that_keeps_failing_is_logged_once_not_at_every_round(
    postgres_url, caplog, cause
):
    """The rounds bringing a stream's subjects in step (every ``subjects_sync_seconds``): one
    that fails (here the stream's id not known yet) was logged at ERROR at every round, and
    with the database away each round's hold of the rounds was a warning. Now each once, then
    once that it works again. The outage is the test's own: a relay to PostgreSQL it cuts."""
    from bastion.facts.store import FactStore
    from bastion.signals.ssf import SsfReceiver

    caplog.set_level(logging.DEBUG, logger=SSF_LOG)

    def said(level: int = logging.DEBUG) -> list[str]:
        return [
            r.getMessage()
            for r in caplog.records
            if r.name == SSF_LOG and r.levelno >= level and r.getMessage().startswith("ssf")
        ]

    app = metadata_only()
    with Relay(("127.0.0.1", 5432)) as relay, serve(app, free_socket()) as url:
        db = Database(postgres_url.replace("127.0.0.1:5432", f"127.0.0.1:{relay.port}"))
        try:
            s = settings(
                delivery="poll",
                subjects_sync_seconds=0.01,
                configuration_url=f"{url}/.well-known/ssf-configuration",
            )
            receiver = SsfReceiver(s, db, OAuthStore(db), FactStore(db), lambda: None)
            t = s.transmitters[0]

            def configured() -> None:
                receiver.store.save_stream(t.name, "enabled", "ok", stream_id="s1", actor="test")

            if cause == "database":
                configured()
            else:  # recorded with no id yet: each round refuses to go on
                receiver.store.save_stream(t.name, "error", "not yet", actor="test")

            async def scenario() -> None:
                task = asyncio.create_task(receiver._sync_forever(t))
                try:
                    if cause == "database":
                        relay.cut()
                    async with asyncio.timeout(PATIENCE):
                        while len(said()) < 6:  # rounds that failed
                            await asyncio.sleep(0.01)
                    assert len(said(logging.WARNING)) == 1, said()
                    if cause == "database":
                        relay.restore()
                    else:
                        await anyio.to_thread.run_sync(configured)
                    async with asyncio.timeout(PATIENCE):
                        while len(said(logging.WARNING)) < 2:
                            await asyncio.sleep(0.01)
                finally:
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)

            anyio.run(scenario)
        finally:
            db.close()
    loud = said(logging.WARNING)
    assert len(loud) == 2 and loud[1].endswith(" again"), loud


def test_subject_changes_at_sign_in_that_keep_failing_are_logged_once_not_at_each_sign_in(
    sqlite_url, caplog, monkeypatch
):
    """A sign-in through a provider a transmitter's ``linked_accounts`` names changes the
    stream's subjects at once (`change_subject`): while that failed (here the stream's id not
    known yet) each sign-in logged a warning, and so did each sign-in past
    ``MAX_PENDING_CHANGES`` changes under way. A morning of sign-ins with the transmitter away
    was a warning per person. Now each once, then once that changes are made again."""
    from bastion.facts.store import FactStore
    from bastion.signals import ssf
    from bastion.signals.ssf import SsfReceiver

    caplog.set_level(logging.DEBUG, logger=SSF_LOG)

    def said(about: str, level: int = logging.DEBUG) -> list[str]:
        return [
            r.getMessage()
            for r in caplog.records
            if r.name == SSF_LOG and r.levelno >= level and about in r.getMessage()
        ]

    app = metadata_only()
    db = Database(sqlite_url)
    try:
        with serve(app, free_socket()) as url:
            s = SsfSettings.from_table(
                {
                    "transmitters": [
                        transmitter(
                            delivery="poll",
                            linked_accounts="corp",
                            configuration_url=f"{url}/.well-known/ssf-configuration",
                        )
                    ]
                },
                issuer="https://bastion.example.com",
                env=ENV,
                providers={"corp": "https://corp.example.com"},
            )
            receiver = SsfReceiver(s, db, OAuthStore(db), FactStore(db), lambda: None)
            t = s.transmitters[0]
            receiver.store.save_stream(t.name, "error", "not yet", actor="test")

            async def scenario() -> None:
                import httpx

                receiver._client = httpx.AsyncClient(timeout=PATIENCE)
                try:
                    for _ in range(4):
                        answer = await receiver.change_subject(t, "email:sam@example.com")
                        assert "the next round tries again" in answer, answer
                    assert len(said("to the next round: ")) == 4
                    assert len(said("to the next round: ", logging.WARNING)) == 1
                    await anyio.to_thread.run_sync(
                        lambda: receiver.store.save_stream(
                            t.name, "enabled", "ok", stream_id="s1", actor="test"
                        )
                    )
                    answer = await receiver.change_subject(t, "email:sam@example.com")
                    assert "no add_subject_endpoint" in answer, answer
                    assert said("subject changes are made again", logging.WARNING)

                    monkeypatch.setattr(ssf, "MAX_PENDING_CHANGES", 0)
                    for n in range(4):
                        receiver.account_signed_in("corp", f"00b{n}", "sam")
                    assert not receiver._changes
                    assert len(said("subject changes pending")) == 4
                    assert len(said("subject changes pending", logging.WARNING)) == 1
                    monkeypatch.setattr(ssf, "MAX_PENDING_CHANGES", 64)
                    receiver.account_signed_in("corp", "00b9", "sam")
                    assert len(receiver._changes) == 1
                    await asyncio.gather(*receiver._changes)
                    assert said("sign-ins' subject changes are made again", logging.WARNING)
                finally:
                    await receiver._client.aclose()

            anyio.run(scenario)
    finally:
        db.close()


def test_a_transmitters_answer_too_large_or_too_slow_is_not_read_and_its_stream_tried_again(
    database_url, monkeypatch
):
    """Every answer of a transmitter (stream management as well as poll) is read within one
    deadline for the whole of it and a size cap: a stream endpoint that answers 2 MiB, then
    one that trickles its answer for ever, are each noted and the stream tried again."""
    from starlette.responses import StreamingResponse

    from bastion.signals import ssf

    monkeypatch.setattr(ssf, "ANSWER_SECONDS", 0.5)

    async def trickle():
        while True:
            yield b" "
            await asyncio.sleep(0.05)

    async def stream(request, state):
        if state["creates"] == 1:
            return Response(b" " * (2 * 1_048_576), media_type="application/json")
        if state["creates"] == 2:
            return StreamingResponse(trickle(), media_type="application/json")
        return created(state)

    async def poll(request, state):
        return JSONResponse({"sets": {}})

    seen, state = streamed(database_url, stream, poll, polls=2)
    details = " | ".join(x["detail"] for x in seen)
    assert "sent more than 1048576 bytes" in details, seen
    assert "did not answer within 0.5 s" in details, seen
    assert state["creates"] == 3


def test_a_streams_change_is_audited_with_its_actor_in_the_changing_transaction(database_url):
    """Each change of a stream's status, id or verification request (configured by the server
    or an administrator's command, verified or updated by its transmitter, in error) is an
    ``ssf.stream_changed`` event naming who made it, written with the change or not at all; a
    note that changes nothing records nothing."""
    db = Database(database_url)
    try:
        store = SsfStore(db)
        audit = AuditLog(db)

        def changes() -> list[tuple]:
            return [
                (e.detail["transmitter"], e.detail["previous"], e.detail["status"],
                 e.detail["stream_id"], e.detail["actor"])
                for e in reversed(audit.events("ssf.stream_changed"))
            ]  # fmt: skip

        store.save_stream(
            "idp", "enabled", "configured", stream_id="s1", verification_state="nonce-7f3",
            actor="cli:alice",
        )  # fmt: skip
        assert changes() == [("idp", None, "enabled", "s1", "cli:alice")]
        with pytest.raises(Killed), db.transaction():
            store.save_stream("idp", "paused", "stream-updated event", actor="ssf:idp")
            raise Killed
        assert store.stream("idp").status == "enabled" and len(changes()) == 1
        assert store.verified("idp", "nonce-7f3", actor="ssf:idp")
        store.save_stream("idp", "error", "unreachable", actor="server")
        store.save_stream("idp", "error", "unreachable again", actor="server")  # no change
        assert changes() == [
            ("idp", None, "enabled", "s1", "cli:alice"),
            ("idp", "enabled", "verified", "s1", "ssf:idp"),
            ("idp", "verified", "error", "s1", "server"),
        ]
        # The verification state asked for is the transmitter's proof: never in a row.
        assert all("nonce-7f3" not in str(e.detail) for e in audit.events("ssf.stream_changed"))
    finally:
        db.close()


def test_a_transmitter_saying_more_is_available_but_sending_nothing_is_not_polled_at_once(
    database_url,
):
    """``moreAvailable`` is a reason to poll again at once only when the answer held SETs: a
    transmitter (broken or hostile) that says it always, with none, was polled in a loop with
    no pause, a core of bastion's and a stream of requests at the transmitter for ever."""
    from bastion.facts.store import FactStore
    from bastion.signals.ssf import SsfReceiver

    polls = []

    async def poll(request):
        polls.append(await request.json())
        return JSONResponse({"sets": {}, "moreAvailable": True})

    db = Database(database_url)
    try:
        with serve(
            Starlette(routes=[Route("/poll", poll, methods=["POST"])]), free_socket()
        ) as url:
            s = settings(delivery="poll", configuration_url=f"{url}/.well-known/ssf-configuration")
            receiver = SsfReceiver(s, db, OAuthStore(db), FactStore(db), lambda: None)
            answer = anyio.run(receiver.poll_once, s.transmitters[0], f"{url}/poll", [], {})
    finally:
        db.close()
    assert len(polls) == 1
    assert answer == (False, [], {})


def test_a_transmitter_that_does_not_say_whether_it_speaks_for_devices_is_named_at_start(
    tmp_path, caplog
):
    """Before ``devices`` was asked for, every transmitter set devices' facts: an MDM configured
    then sets none now, and its operator is told so when bastion starts, naming it; one that
    says ``devices = false`` (or true) is not named."""
    from bastion.facts.store import FactStore
    from bastion.signals.ssf import SsfReceiver

    table = {
        "transmitters": [
            transmitter(name="mdm", delivery="poll", push_token_env=None),
            transmitter(name="idp", issuer="https://idp2.example.com", devices=False),
            transmitter(
                name="mdm2",
                issuer="https://mdm2.example.com",
                delivery="poll",
                push_token_env=None,
                devices=True,
            ),
        ]
    }
    s = SsfSettings.from_table(table, issuer="https://bastion.example.com", env=ENV)
    assert [t.devices for t in s.transmitters] == [None, False, True]
    db = Database(str(tmp_path / "b.db"))
    receiver = SsfReceiver(s, db, OAuthStore(db), FactStore(db), lambda: None)

    async def started_and_closed() -> None:
        await receiver.start()
        await receiver.close()

    try:
        with caplog.at_level("WARNING", logger="bastion.signals.ssf"):
            asyncio.run(started_and_closed())
    finally:
        db.close()
    named = [r.getMessage() for r in caplog.records if "devices is not set" in r.getMessage()]
    assert len(named) == 1 and named[0].startswith("ssf transmitter mdm:"), named
    assert "devices = true" in named[0]


def test_an_issuer_holding_the_separator_cannot_make_another_accounts_key():
    """``iss_sub`` keys are ``iss_sub:<iss>|<sub>``; subs often hold ``|`` (``auth0|abc``). An
    issuer holding one (no URL does: RFC 3986) made the key of another issuer's account:
    ``https://t.example/|auth0`` + ``abc`` was ``https://t.example/`` + ``auth0|abc``."""
    mapped = parse_subject({"format": "iss_sub", "iss": "https://t.example/", "sub": "auth0|abc"})
    assert mapped.user_keys == ("iss_sub:https://t.example/|auth0|abc",)
    with pytest.raises(SubjectError, match="iss"):
        parse_subject({"format": "iss_sub", "iss": "https://t.example/|auth0", "sub": "abc"})


def test_aliases_name_a_user_through_any_of_their_identifiers_and_never_two_users():
    """RFC 9493 ``aliases``: identifiers all of one subject. It names the user any of
    them maps to; identifiers mapping to two users name no one (nothing is applied to either)."""
    users = {"email:sam@example.com": "sam", "opaque:d-1": "dana"}
    sam = {"format": "email", "email": "Sam@example.com"}
    other = {"format": "email", "email": "sam@elsewhere.example"}
    subject = parse_subject({"format": "aliases", "identifiers": [other, sam]})
    assert user_of(subject, users) == "sam"
    assert user_of(parse_subject(sam), users) == "sam"
    assert user_of(parse_subject(other), users) is None
    both = parse_subject(
        {"format": "aliases", "identifiers": [sam, {"format": "opaque", "id": "d-1"}]}
    )
    with pytest.raises(SubjectError, match="more than one user"):
        user_of(both, users)
    in_complex = parse_subject(
        {"format": "complex", "user": {"format": "aliases", "identifiers": [other, sam]}}
    )
    assert user_of(in_complex, users) == "sam"
    for bad in (
        {"format": "aliases", "identifiers": []},
        {"format": "aliases", "identifiers": "x"},
        {"format": "aliases", "identifiers": [{"format": "aliases", "identifiers": [sam]}]},
        {"format": "aliases", "identifiers": [sam] * 33},
        {"format": "complex", "device": {"format": "aliases", "identifiers": [sam]}},
    ):
        with pytest.raises(SubjectError):
            parse_subject(bad)


def test_a_transmitters_metadata_that_cannot_be_had_is_not_fetched_for_every_set(
    published_keys, tmp_path
):
    """Its key set's failures are remembered for jwks_refresh_seconds, and so must the
    metadata's that names it: each SET pushed while it answered 503 fetched it again (each up
    to 10 s), as many at once as SETs came."""
    key = ECKey.generate_key("P-256", parameters={"kid": "k1"})
    published_keys["keys"] = [key.as_dict(private=False)]
    published_keys["metadata_status"] = 503
    now = [1000.0]
    receiver, t, db = receiver_of(
        published_keys, tmp_path, clock=lambda: now[0], jwks_refresh_seconds=60
    )

    async def many(count: int) -> list:
        results: list = []

        async def one() -> None:
            try:
                results.append(await receiver.keys(t, set_with_kid("k1")))
            except SetRefused as e:
                results.append(e)

        async with anyio.create_task_group() as tg:
            for _ in range(count):
                tg.start_soon(one)
        return results

    try:
        refused = anyio.run(many, 5)
        assert all(isinstance(r, SetRefused) and r.err == "invalid_key" for r in refused)
        assert "503" in refused[0].description
        refused = anyio.run(many, 5)
        assert all(isinstance(r, SetRefused) for r in refused)
        assert published_keys["metadata_fetches"] == 1
        published_keys["metadata_status"] = 200
        now[0] += 61  # past jwks_refresh_seconds: fetched again, and kept
        assert all(r.get_by_kid("k1") for r in anyio.run(many, 3))
        assert published_keys["metadata_fetches"] == 2
    finally:
        db.close()


def test_a_stream_whose_iss_is_not_the_transmitters_is_not_used(tmp_path):
    """SSF 1.0 §8.1.1.1 and §8.1.1.2: "The Receiver MUST check the response and confirm that
    the iss value matches the Issuer from which it received the Transmitter Configuration
    data." bastion took any stream (and polled the endpoint it named)."""
    from bastion.facts.store import FactStore
    from bastion.signals.ssf import SsfReceiver

    state = {"url": "", "iss": "https://evil.example", "polls": 0}

    async def metadata(request):
        return JSONResponse(
            {"issuer": ISSUER, "configuration_endpoint": f"{state['url']}/stream",
             **({"default_subjects": state["default_subjects"]} if "default_subjects" in state
                else {})}
        )  # fmt: skip

    async def stream(request):
        # Created by a POST; read by a GET (SSF 1.0 §8.1.1.2: 200).
        status = 201 if request.method == "POST" else 200
        return JSONResponse({**json.loads(created(state).body), "iss": state["iss"]}, status)

    app = Starlette(
        routes=[
            Route("/.well-known/ssf-configuration", metadata),
            Route("/stream", stream, methods=["GET", "POST"]),
        ]
    )
    db = Database(str(tmp_path / "b.db"))
    try:
        with serve(app, free_socket()) as url:
            state["url"] = url
            s = settings(delivery="poll", configuration_url=f"{url}/.well-known/ssf-configuration")
            receiver = SsfReceiver(s, db, OAuthStore(db), FactStore(db), lambda: None)
            t = s.transmitters[0]
            for iss in ("https://evil.example", None):
                state["iss"] = iss
                with pytest.raises(ValueError, match="iss"):
                    anyio.run(receiver.configure, t)
                assert receiver.store.stream(t.name) is None
            state["iss"] = ISSUER
            assert anyio.run(receiver.configure, t).stream["stream_id"] == "s1"
            assert "NONE" not in anyio.run(receiver.sync_subjects, t).note
            # SSF 1.0 §7.1 default_subjects NONE: no events until subjects are added, which
            # a transmitter without add_subject_endpoint gives no way to do; its subjects'
            # status says so (it said nothing, and nothing came).
            state["default_subjects"] = "NONE"
            # Read by a receiver started now (one running reads it once its lifetime ends).
            receiver = SsfReceiver(s, db, OAuthStore(db), FactStore(db), lambda: None)
            anyio.run(receiver.configure, t)
            note = anyio.run(receiver.sync_subjects, t).note
            assert "no add_subject_endpoint" in note and "default_subjects is NONE" in note
    finally:
        db.close()


def test_stream_events_count_only_for_the_stream_they_name(published_keys, tmp_path):
    """SSF 1.0 §8.1.4.1 and §8.1.5: a verification or stream-updated event's sub_id is an
    ``opaque`` subject whose id is the stream's; stream-updated's status is enabled, paused or
    disabled. One naming another stream was taken as this one's."""
    from tests.signals.transmitter import VERIFICATION, Transmitter

    key = ECKey.generate_key("P-256", parameters={"kid": "k1"})
    published_keys["keys"] = [key.as_dict(private=False)]
    receiver, t, db = receiver_of(published_keys, tmp_path)
    sender = Transmitter("https://bastion.example.com")
    sender.url, sender.key = ISSUER, key
    updated = "https://schemas.openid.net/secevent/ssf/event-type/stream-updated"
    try:
        receiver.store.save_stream(
            t.name, "enabled", "configured", stream_id="s1", verification_state="st1", actor="t"
        )
        for token in (
            sender.set_token(VERIFICATION, {"state": "st1"}, {"format": "opaque", "id": "s2"}),
            sender.set_token(VERIFICATION, {"state": "st1"}),
            sender.set_token(updated, {"status": "disabled"}, {"format": "opaque", "id": "s2"}),
            sender.set_token(updated, {"status": "gone"}, {"format": "opaque", "id": "s1"}),
        ):
            outcome = verify_set_with(receiver, t, token)
            assert outcome.effects[0]["result"].startswith("ignored"), outcome
            stored = receiver.store.stream(t.name)
            assert (stored.status, stored.verified_at) == ("enabled", None)
        verify_set_with(
            receiver,
            t,
            sender.set_token(updated, {"status": "paused", "reason": "maintenance"},
                             {"format": "opaque", "id": "s1"}),
        )  # fmt: skip
        assert receiver.store.stream(t.name).status == "paused"
        # The transmitter's words are the audit event's, not the status /readyz shows.
        assert "maintenance" not in receiver.store.stream(t.name).detail
        verify_set_with(
            receiver,
            t,
            sender.set_token(VERIFICATION, {"state": "st1"}, {"format": "opaque", "id": "s1"}),
        )
        assert receiver.store.stream(t.name).status == "verified"
    finally:
        db.close()


def test_a_stream_the_transmitter_already_holds_is_used_when_it_is_bastions_and_named_if_not(
    tmp_path,
):
    """SSF 1.0 §8.1.1.1: a transmitter that allows one stream per receiver answers a second
    create 409. bastion (its database lost the stream's id, or another replica made it) reads
    the stream from the transmitter's list and uses it when it is the one bastion would create,
    and brings it in step when it is bastion's and differs. A 409 was an error always."""
    from bastion.signals.settings import CAEP
    from tests.signals.transmitter import BEARER, Transmitter, receivers_of

    idp = Transmitter("https://bastion.example.com")
    idp.one_stream = True
    env = {"PUSH": "p" * 32, "OTHER_PUSH": "o" * 32, "BEARER": BEARER}
    with receivers_of(idp, tmp_path, env) as configured:
        first, _, _ = configured("first")
        again, problem, recorded = configured("lost")  # the stream's id was lost
        assert problem is None, problem
        assert again["stream_id"] == first["stream_id"] == recorded.stream_id
        assert len(idp.streams) == 1
        # Found in the transmitter's list (read first when no id is recorded, since
        # 2026-12-08), not by a create answered 409; nothing to change.
        assert [m for m, _ in idp.stream_calls] == ["POST"]
        # Since 2026-12-06 a stream that is bastion's and differs is brought in step, not
        # refused (tests/signals/test_ssf_stream_update.py): pushing elsewhere, with another
        # token, lacking an event type bastion asks for.
        for name, changes, member in (
            ("elsewhere", {"push_url": "https://other.example.com/ssf/events"}, "delivery"),
            ("other-token", {"push_token_env": "OTHER_PUSH"}, "delivery"),
        ):  # fmt: skip
            stream, problem, recorded = configured(name, **changes)
            assert problem is None, problem
            assert recorded.stream_id == first["stream_id"]
            assert set(idp.stream_calls[-1][1]) == {"stream_id", member}
        held = idp.stream("urn:ietf:rfc:8935")
        held["events_requested"].remove(CAEP + "session-revoked")
        stream, problem, recorded = configured("fewer-events", push_token_env="OTHER_PUSH")
        assert problem is None, problem
        assert idp.stream_calls[-1][1]["events_requested"] == held["events_requested"]
        assert CAEP + "session-revoked" in held["events_requested"]


def test_a_stream_made_but_not_recorded_is_used_not_made_again(tmp_path):
    """A transmitter that allows many streams per receiver: a process that stopped between
    making its stream and recording the stream's id (or a database lost) made a second stream
    at its next start, and the first, still holding the events queued for bastion (or pushing
    them as well), was left. With no id recorded, bastion now reads the transmitter's list
    first (SSF 1.0 §8.1.1.2) and uses the stream there that is the one it would make."""
    from tests.signals.transmitter import BEARER, Transmitter, receivers_of

    idp = Transmitter("https://bastion.example.com")
    env = {"PUSH": "p" * 32, "OTHER_PUSH": "o" * 32, "BEARER": BEARER}
    with receivers_of(idp, tmp_path, env) as configured:
        first, _, _ = configured("first")
        again, _, recorded = configured("lost")  # made, its id never recorded
        assert again["stream_id"] == first["stream_id"] == recorded.stream_id
        assert len(idp.streams) == 1
        assert [m for m, _ in idp.stream_calls] == ["POST"]
        # One that is not the one bastion would make (another token: another deployment's, or
        # bastion's before its token changed) is left to its owner: a stream is made.
        other, _, recorded = configured("other-token", push_token_env="OTHER_PUSH")
        assert other["stream_id"] != first["stream_id"] and first["stream_id"] in idp.streams
        assert recorded.stream_id == other["stream_id"] and len(idp.streams) == 2


def test_a_streams_subjects_are_recorded_and_audited_on_each_database(database_url):
    """What bastion added to a stream (SSF 1.0 §8.1.3), failed to add or to remove: a change of
    state is audited once, in the transaction that records it (a failure retried with the same
    words is not a new event), and a subject removed leaves no row; linked accounts are read as
    ``iss_sub`` keys of the provider's issuer."""
    from bastion.identity.accounts import MIGRATIONS

    db = Database(database_url)
    try:
        db.migrate("identity", MIGRATIONS)
        store, audit = SsfStore(db), AuditLog(db)
        key = "email:sam@example.com"

        def events(kind: str) -> list[tuple]:
            return [(e.detail["subject_key"], e.detail.get("state"), e.detail["actor"])
                    for e in reversed(audit.events(kind))]  # fmt: skip

        for state, detail in (("add_failed", "add answered HTTP 403"),
                              ("add_failed", "add answered HTTP 403"),
                              ("added", "add answered HTTP 200")):  # fmt: skip
            store.note_subject(
                "idp", key, username="sam", stream_id="s1", state=state, detail=detail,
                actor="server",
            )  # fmt: skip
        assert events("ssf.subject_failed") == [(key, "add_failed", "server")]
        assert events("ssf.subject_added") == [(key, "added", "server")]
        assert store.subjects("idp")[key].state == "added"
        with pytest.raises(Killed), db.transaction():
            store.forget_subject("idp", key, detail="remove answered HTTP 204", actor="server")
            raise Killed
        assert key in store.subjects("idp") and events("ssf.subject_removed") == []
        store.forget_subject("idp", key, detail="remove answered HTTP 204", actor="cli:alice")
        assert store.subjects("idp") == {}
        assert events("ssf.subject_removed") == [(key, None, "cli:alice")]
        db.execute(
            "INSERT INTO identity_accounts (provider, subject, username, facts, last_login_at)"
            " VALUES ('corp', 'auth0|7', 'dana', '[]', 0)"
        )
        accounts = store.linked_accounts("corp", "https://login.example.com")
        assert accounts == {"iss_sub:https://login.example.com|auth0|7": "dana"}
        assert (
            store.linked_users(
                "corp", "https://login.example.com", (*accounts, "iss_sub:https://other|auth0|7")
            )
            == accounts
        )
    finally:
        db.close()


def test_a_stream_left_in_error_out_of_step_is_not_marked_verified_by_an_earlier_request(
    database_url,
):
    """A verification asked for by an earlier configure may arrive after a later one left the
    stream in error, not in step (its update refused): that event proves the transmitter
    answers, not that the stream holds what bastion asks for. The stream stays in error. CI
    saw the poll deliver such an event between the refused update and the status read."""
    db = Database(database_url)
    try:
        store = SsfStore(db)
        store.save_stream(
            "idp", "enabled", "configured", stream_id="s1", verification_state="nonce-1",
            actor="cli:alice",
        )  # fmt: skip
        store.save_stream(
            "idp", "error", "not in step", stream_id="s1", forget_verification=True,
            actor="cli:alice",
        )  # fmt: skip
        assert not store.verified("idp", "nonce-1", actor="ssf:idp")
        assert store.stream("idp").status == "error"
        # A later configure asks again, and its event is taken.
        store.save_stream(
            "idp", "enabled", "configured", verification_state="nonce-2", actor="cli:alice"
        )
        assert store.verified("idp", "nonce-2", actor="ssf:idp")
        assert store.stream("idp").status == "verified"
    finally:
        db.close()
