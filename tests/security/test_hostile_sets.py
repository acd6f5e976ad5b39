"""Hostile pushes at the Shared Signals receiver (RFC 8935, ``POST /ssf/events``) of a served
bastion, SQLite and PostgreSQL, with a real transmitter (tests/signals/transmitter.py) whose
stream bastion created and verified: odd bodies, ``Content-Type`` and ``Authorization`` headers
(the stream's ``authorization_header``, and others), and SETs well signed with the transmitter's
key whose claims, JOSE header, events and subjects (every RFC 9493 and SSF 1.0 format) hold a
hostile JSON value in one place (`tests.security.hostile_json`). None may answer anything but
202 or RFC 8935's 400/401/413 ``{"err", "description"}``, log a traceback or, when refused,
change a row of any table (`tests.security.rows`); a SET accepted is recorded as received, and
each fact it writes holds the value the event says, of its type. Then SETs with odd values that
are valid (text beyond ASCII, a surrogate pair as escapes, U+2028, the longest ``jti``, numbers at
64 bits) are accepted and stored as they say. Derandomized, so a run in CI draws what a run here
drew."""

from __future__ import annotations

import base64
import json
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from hypothesis import assume, given
from hypothesis import strategies as st

from bastion.audit.log import AuditLog
from bastion.db import Database
from bastion.facts.model import Entity
from bastion.facts.store import FactStore
from bastion.oauth.store import OAuthStore
from bastion.oauth.users import create_user
from bastion.signals.settings import OAUTH, SSF
from bastion.signals.ssf_store import SsfStore
from tests.conftest import postgres_schema
from tests.draws import fuzzed
from tests.oauth.support import free_socket, serve
from tests.security.conftest import OAUTH as OAUTH_TABLE
from tests.security.conftest import logged_since
from tests.security.hostile_headers import AUTHORIZATION, CONTENT_TYPE, HEADER_BYTES
from tests.security.hostile_json import VALUES, placed, places
from tests.security.rows import snapshot, unexpected_changes
from tests.server.conftest import POLICY, ServerProcess
from tests.signals.transmitter import BEARER, CAEP, RISC, Transmitter
from tests.waits import PATIENCE

AUDIENCE = "https://bastion.test/ssf"
PUSH_TOKEN = "push-credential-of-the-fuzzed-stream"
SET_TYPE = "application/secevent+jwt"
# What the facts of the events are, to the policy (a fact it cannot hold is skipped).
DECLARED = """
declare device_compliance(User, String);
declare device_compliance(Device, String);
declare assurance_level(User, String);
declare assurance_level(Device, String);
declare risk_level(User, String);
declare risk_level(Device, String);
declare token_claim(User, String, String);
declare token_claim(User, String, Integer);
declare token_claim(User, String, Boolean);
declare token_claim(Device, String, String);
"""
USERS = {
    "email:sam@example.com": "sam",
    "iss_sub:https://idp.example|00u1": "sam",
    "opaque:avery-1": "avery",
    "phone_number:+12025550123": "morgan",
    "account:acct:sam@example.com": "sam",
    "did:did:example:123": "sam",
    "uri:https://example.com/u/1": "sam",
}
CONFIG = """
[signals.ssf]

[[signals.ssf.transmitters]]
name = "idp"
issuer = "%(issuer)s"
audience = "%(audience)s"
delivery = "push"
bearer_env = "BASTION_TEST_SSF_BEARER"
push_token_env = "BASTION_TEST_SSF_PUSH"
devices = true

[signals.ssf.transmitters.users]
%(users)s
"""
SAM = {"format": "email", "email": "sam@example.com"}
DEVICE = {"format": "opaque", "id": "laptop-7"}
# A subject of each format (RFC 9493 §3.2, SSF 1.0 §3.3-§3.4, Google's subject_type).
SUBJECTS = [
    SAM,
    {"format": "iss_sub", "iss": "https://idp.example", "sub": "00u1"},
    {"format": "opaque", "id": "avery-1"},
    {"format": "phone_number", "phone_number": "+12025550123"},
    {"format": "account", "uri": "acct:sam@example.com"},
    {"format": "did", "url": "did:example:123"},
    {"format": "uri", "uri": "https://example.com/u/1"},
    {"format": "aliases", "identifiers": [SAM, {"format": "opaque", "id": "x"}]},
    {"format": "complex", "user": SAM, "device": DEVICE, "session": {"format": "opaque", "id": "s"},
     "tenant": {"format": "opaque", "id": "t"}},
    {"format": "complex", "device": DEVICE},
    {"format": "jwt_id", "iss": "https://idp.example", "jti": "j1"},
    {"format": "saml_assertion_id", "issuer": "https://idp.example", "assertion_id": "a1"},
    {"format": "ip-addresses", "ip-addresses": ["10.0.0.1", "::1"]},
    {"subject_type": "email", "email": "sam@example.com"},
    {"format": "x-custom", "value": "v"},
]  # fmt: skip
REASONS = {"initiating_entity": "policy", "reason_admin": {"en": "r"}, "reason_user": {"en": "u"}}
# Each event type, with a body of its members (CAEP 1.0 §3, RISC 1.0 §2, SSF 1.0 §8.1.4-§8.1.5).
EVENTS = {
    CAEP + "session-revoked": REASONS,
    CAEP + "credential-change": {"credential_type": "password", "change_type": "update", **REASONS},
    CAEP + "device-compliance-change": {"current_status": "not-compliant",
                                        "previous_status": "compliant", **REASONS},
    CAEP + "assurance-level-change": {"namespace": "NIST-AAL", "current_level": "nist-aal2",
                                      "previous_level": "nist-aal1",
                                      "change_direction": "increase"},
    CAEP + "token-claims-change": {"claims": {"role": "admin", "n": 7, "trusted": True}},
    CAEP + "risk-level-change": {"current_level": "HIGH", "previous_level": "LOW",
                                 "principal": "USER", "risk_reason": "r"},
    RISC + "account-disabled": {"reason": "hijacking"},
    RISC + "identifier-changed": {"new-value": "sam2@example.com"},
    RISC + "sessions-revoked": {},
    OAUTH + "tokens-revoked": {},
    SSF + "verification": {"state": "s"},
    SSF + "stream-updated": {"status": "enabled", "reason": "r"},
    "https://example.com/event-type/unknown": {"a": 1},
}  # fmt: skip


def said_values(event_type: str, body: Any) -> dict[tuple, Any]:
    """The facts a fact event says: {(predicate, its terms between the entity and the value):
    the value} (what bastion refuses to write is never among what it wrote)."""
    if not isinstance(body, dict):
        return {}
    name = event_type.removeprefix(CAEP)
    if name == "token-claims-change":
        claims = body.get("claims")
        return (
            {("token_claim", k): v for k, v in claims.items()} if isinstance(claims, dict) else {}
        )
    predicate = {"device-compliance-change": ("device_compliance", "current_status"),
                 "assurance-level-change": ("assurance_level", "current_level"),
                 "risk-level-change": ("risk_level", "current_level")}.get(name)  # fmt: skip
    return {(predicate[0],): body.get(predicate[1])} if predicate else {}


# Bodies that are no SET, as sent.
BODIES = [
    b"",
    b" ",
    b"a.b.c",
    b"..",
    b"....",
    b"\xff",
    "é.é.é".encode(),
    b"e30.e30.e30",
    b"e30.e30.",
    b"W10.W10.W10",  # arrays, not objects
    b"bnVsbA.bnVsbA.bnVsbA",  # null
    b"%ff.%ff.%ff",
    b"eyJhbGciOiJFUzI1NiIsImtpZCI6Ilx1ZDgwMCJ9.e30.e30",  # a kid with a lone surrogate
    b"eyJhbGciOiJFUzI1NiIsImtpZCI6Ilx1MDAwMCJ9.e30.e30",  # a kid with a NUL
    b"eyJhbGciOiJFUzI1NiIsImtpZCI6N30.e30.e30",  # a kid that is a number
    b"x" * 70_000,
    b"a" * 60_000 + b".b.c",
    b"\x00.\x00.\x00",
]
PUSH_AUTHORIZATION = [
    f"bearer {PUSH_TOKEN}".encode(),
    f"BEARER {PUSH_TOKEN}".encode(),
    f"Bearer  {PUSH_TOKEN}".encode(),
    f"Bearer {PUSH_TOKEN}\t".encode(),
    f"Bearer {PUSH_TOKEN} x".encode(),
    f"Bearer {PUSH_TOKEN[:-1]}".encode(),
    f"Bearer {PUSH_TOKEN}".encode() + b"\xe9",
    f"Bearer {PUSH_TOKEN}é".encode(),
    f"Bearer {PUSH_TOKEN}, Bearer x".encode(),
    f"Bearer {PUSH_TOKEN.upper()}".encode(),
    b"Basic " + base64.b64encode(PUSH_TOKEN.encode()),
    f"DPoP {PUSH_TOKEN}".encode(),
    PUSH_TOKEN.encode(),
    f"Bearer {BEARER}".encode(),  # bastion's own credential at the transmitter
]
PUSH_CONTENT_TYPE = [
    b"application/secevent+jwt; charset=\xe9",
    b"application/secevent+jwt;;",
    b'application/secevent+jwt; charset="',
    b"APPLICATION/SECEVENT+JWT",
    b"application/secevent+jwt , application/json",
    b"application/jwt",
    b"application/secevent",
    b"secevent+jwt",
]
# A SET accepted, RFC 8935's errors, and a multipart body (refused by every route).
ANSWERED = {202, 400, 401, 413, 415}
# The HTTP server's own answer to a request head it cannot read (a header's value with a byte
# HTTP does not allow), before bastion sees the request.
INVALID_HTTP = "Invalid HTTP request received."


def b64(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def signed(t: Transmitter, header: bytes, payload: bytes) -> bytes:
    """A compact JWS of ``payload`` (JSON text as it is) under the JOSE ``header`` (likewise),
    signed ES256 with the transmitter's key whatever the header says."""
    signing_input = b64(header) + b"." + b64(payload)
    der = t.key.private_key.sign(signing_input, ec.ECDSA(hashes.SHA256()))
    r, s = decode_dss_signature(der)
    return signing_input + b"." + b64(r.to_bytes(32, "big") + s.to_bytes(32, "big"))


def claims_of(issuer: str, event_type: str, subject: Any, stream_id: str) -> dict:
    """A SET's claims that bastion accepts: the event's body and a subject of ``subject``'s
    format (the stream's own, for the stream's events)."""
    if event_type.startswith(SSF):
        subject = {"format": "opaque", "id": stream_id}
    return {
        "iss": issuer,
        "aud": AUDIENCE,
        "iat": int(time.time()),
        "jti": uuid.uuid4().hex,
        "txn": "t-1",
        "events": {event_type: EVENTS[event_type]},
        "sub_id": subject,
    }


HEADER = {"alg": "ES256", "typ": "secevent+jwt", "kid": "k1"}


@dataclass
class Receiver:
    """A served bastion receiving the pushes of ``transmitter``'s stream."""

    server: ServerProcess
    transmitter: Transmitter
    db: Database
    http: httpx.Client
    stream_id: str

    def push(self, body: bytes, headers: dict[str, bytes] | None = None) -> httpx.Response:
        sent = {"content-type": SET_TYPE.encode(), "authorization": f"Bearer {PUSH_TOKEN}".encode()}
        sent.update(headers or {})
        return self.http.post("/ssf/events", content=body, headers=sent)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def receiver(request, tmp_path_factory) -> Iterator[Receiver]:
    tmp = tmp_path_factory.mktemp("hostile-sets")
    transmitter = Transmitter(AUDIENCE)
    os.environ["BASTION_TEST_SSF_PUSH"] = PUSH_TOKEN
    os.environ["BASTION_TEST_SSF_BEARER"] = BEARER
    with serve(transmitter.app(), free_socket()) as url, _database(request.param, tmp) as database:
        transmitter.url = url
        policy = tmp / "policy.polar"
        policy.write_text(POLICY + DECLARED)
        server = ServerProcess(database, tmp, str(policy))
        users = "\n".join(f'"{k}" = "{v}"' for k, v in USERS.items())
        config = OAUTH_TABLE % (tmp / "keys") + CONFIG % {
            "issuer": url, "audience": AUDIENCE, "users": users,
        }  # fmt: skip
        (tmp / "bastion.toml").write_text(config.replace("{url}", server.url))
        server.env["BASTION_CONFIG"] = str(tmp / "bastion.toml")
        server.start()
        db = Database(database)
        try:
            for name in sorted(set(USERS.values())):
                create_user(OAuthStore(db), name, "a password of sam's", time.time(), actor="test")
            store = SsfStore(db)
            deadline = time.monotonic() + PATIENCE
            # Verified, and its subjects noted (the transmitter adds none): nothing more comes
            # from the stream's task for a minute.
            while not ((s := store.stream("idp")) and s.verified_at and s.subjects is not None):
                assert time.monotonic() < deadline, (s, server.log.read_text()[-3000:])
                time.sleep(0.05)
            with httpx.Client(base_url=server.url, timeout=30) as http:
                yield Receiver(server, transmitter, db, http, s.stream_id)
        finally:
            db.close()
            server.stop()


def _database(kind: str, tmp):
    if kind == "postgresql":
        return postgres_schema()
    from contextlib import nullcontext

    return nullcontext(str(tmp / "bastion.db"))


@st.composite
def pushes(draw: st.DrawFn) -> tuple[str, Any, Any, bytes]:
    """(where: "claims", "header", "body", "authorization" or "content-type"; the event type;
    the subject, or the path in the claims or header; the value)."""
    where = draw(st.sampled_from(["claims"] * 12 + ["header", "body", "authorization",
                                                    "content-type"]))  # fmt: skip
    event_type = draw(st.sampled_from(sorted(EVENTS)))
    subject = draw(st.sampled_from(SUBJECTS))
    if where == "claims":
        claims = claims_of("http://127.0.0.1:9", event_type, subject, "s")
        path = draw(st.sampled_from(places(claims)))
        return where, (event_type, subject), path, draw(VALUES).encode()
    if where == "header":
        path = draw(st.sampled_from(places(HEADER)))
        return where, (event_type, subject), path, draw(VALUES).encode()
    if where == "body":
        return where, (event_type, subject), None, draw(st.sampled_from(BODIES))
    if where == "authorization":
        value = draw(st.one_of(st.sampled_from(PUSH_AUTHORIZATION + AUTHORIZATION),
                               HEADER_BYTES.map(b"Bearer ".__add__)))  # fmt: skip
        return where, (event_type, subject), None, value
    value = draw(st.one_of(st.sampled_from(PUSH_CONTENT_TYPE + CONTENT_TYPE), HEADER_BYTES))
    return where, (event_type, subject), None, value


def sent_for(r: Receiver, push: tuple) -> tuple[bytes, dict[str, bytes], bytes | None]:
    """(the body, the headers, the claims' JSON text when the body is a SET) of ``push``."""
    where, (event_type, subject), path, value = push
    claims = claims_of(r.transmitter.url, event_type, subject, r.stream_id)
    payload = json.dumps(claims).encode()
    header = json.dumps(HEADER).encode()
    if where == "claims":
        payload = placed(claims, path, value.decode())
    elif where == "header":
        header = placed(HEADER, path, value.decode())
    elif where == "body":
        return value, {}, None
    token = signed(r.transmitter, header, payload)
    if where in ("authorization", "content-type"):
        return token, {where: value}, payload
    return token, {}, payload


def assert_stored_as_said(r: Receiver, payload: bytes, seq: int) -> None:
    """A SET accepted: recorded as received with its jti and event types, and each fact written
    from it holds the value its event says, of that value's type, about its subject's user or
    device."""
    claims = json.loads(payload)
    found = [
        e for e in AuditLog(r.db).events("signal.received", limit=50)
        if e.detail.get("jti") == claims["jti"]
    ]  # fmt: skip
    assert len(found) == 1, (claims, found)
    assert found[0].detail["events"] == list(claims["events"]), found[0].detail
    # A user the users table maps a subject to, or the device the subject names.
    about = {Entity("User", user) for user in USERS.values()}
    subject = claims.get("sub_id")
    device = subject.get("device") if isinstance(subject, dict) else None
    if isinstance(device, dict) and isinstance(device.get("id"), str):
        about.add(Entity("Device", device["id"]))
    said: dict[tuple, Any] = {}
    for event_type, body in claims["events"].items():
        said.update(said_values(event_type, body))
    wrote = sum(
        int(effect["result"].split()[1])
        for effect in found[0].detail["effects"]
        if str(effect.get("result", "")).startswith("wrote ")
    )
    written = [
        f.fact
        for change in FactStore(r.db).changes_since(seq)
        if change.actor == "ssf:idp"
        for f in change.inserts
    ]
    assert len(written) == wrote, (written, found[0].detail)
    for fact in written:
        key = (fact[0], *fact[2:-1])
        assert key in said, (fact, said)
        value = said[key]
        assert fact[-1] == value and type(fact[-1]) is type(value), (fact, value)
        assert fact[1] in about, (fact, claims["sub_id"])


def test_no_hostile_push_answers_5xx_or_stores_anything_it_refuses(receiver):
    r = receiver
    log = r.server.log
    examples = 500 if not r.db.is_postgres else 150

    @fuzzed(examples)
    @given(push=pushes())
    def probe(push: tuple) -> None:
        body, headers, payload = sent_for(r, push)
        before = snapshot(r.db)
        seq = FactStore(r.db).head()
        seen = log.stat().st_size
        try:
            answer = r.push(body, headers)
        except httpx.LocalProtocolError:
            assume(False)  # a header this client will not send tells nothing of the server
            raise
        assert answer.status_code in ANSWERED, (push, answer.status_code, answer.text[:500])
        written = logged_since(log, seen)
        assert "Traceback" not in written, (push, written[-3000:])
        if answer.status_code == 202:
            assert payload is not None, push
            assert_stored_as_said(r, payload, seq)
            return
        if answer.text != INVALID_HTTP:
            assert answer.headers["content-type"] == "application/json", (push, answer.text)
            assert set(answer.json()) == {"err", "description"}, (push, answer.text)
        changed = unexpected_changes(before, snapshot(r.db))
        assert not changed, (push, answer.status_code, answer.text[:300], changed)

    probe()
    assert "Traceback" not in log.read_text()


# Values that are odd and valid: each is stored as it was sent.
ODD_LEVELS = [
    "日本",
    "\U0001f600",
    "e\u0301",  # not NFC: kept, not normalized
    "\u00e9",
    "\u2028",
    " a ",
    "\u00a0",
    "x" * 128,  # the longest level
    "\u0663",
]
ODD_CLAIMS = {
    "名前": "値",
    "max": 2**63 - 1,
    "min": -(2**63),
    "yes": True,
    "no": False,
    "zero": 0,
    "line": "a\u2028b",
    "e\u0301": "\U0001f600",
    "long": "x" * 512,  # the longest claim value
    "accents": "é" * 100,
}


def test_a_set_with_odd_but_valid_values_is_accepted_and_stored_as_it_says(receiver):
    r = receiver
    t = r.transmitter
    facts = FactStore(r.db)
    sam = Entity("User", "sam")
    for level in ODD_LEVELS:
        claims = claims_of(t.url, CAEP + "assurance-level-change", SAM, r.stream_id)
        claims["events"] = {CAEP + "assurance-level-change": {"current_level": level}}
        # ensure_ascii: a character past U+FFFF goes as its surrogate pair's escapes.
        answer = r.push(signed(t, json.dumps(HEADER).encode(), json.dumps(claims).encode()))
        assert answer.status_code == 202, (level, answer.text)
        assert [f.fact[-1] for f in facts.get(("assurance_level", sam, None))] == [level]
    claims = claims_of(t.url, CAEP + "token-claims-change", SAM, r.stream_id)
    claims["events"] = {CAEP + "token-claims-change": {"claims": ODD_CLAIMS}}
    # The longest jti, of characters beyond ASCII; a txn of them; an iat with a fraction.
    claims.update(jti="\U0001f600" * 256, txn="取引-\u2028", iat=time.time() - 0.5)
    payload = json.dumps(claims, ensure_ascii=False).encode()
    seq = facts.head()
    answer = r.push(signed(t, json.dumps(HEADER).encode(), payload))
    assert answer.status_code == 202, answer.text
    assert_stored_as_said(r, payload, seq)
    stored = {f.fact[2]: f.fact[3] for f in facts.get(("token_claim", sam, None, None))}
    for name, value in ODD_CLAIMS.items():
        assert name in stored and stored[name] == value, (name, stored.get(name))
        assert type(stored[name]) is type(value), (name, stored[name])
    found = [
        e for e in AuditLog(r.db).events("signal.received", limit=20)
        if e.detail.get("jti") == claims["jti"]
    ]  # fmt: skip
    assert found[0].detail["txn"] == claims["txn"], found[0].detail
    # The same jti again is a replay, refused, and changes nothing.
    before = snapshot(r.db)
    again = r.push(signed(t, json.dumps(HEADER).encode(), payload))
    assert again.status_code == 400 and "replay" in again.json()["description"], again.text
    assert not unexpected_changes(before, snapshot(r.db))
    # A device named beyond ASCII, by the transmitter that speaks for devices.
    device = {"format": "opaque", "id": "poste-é-\U0001f600"}
    claims = claims_of(t.url, CAEP + "device-compliance-change", None, r.stream_id)
    claims["sub_id"] = {"format": "complex", "user": SAM, "device": device}
    answer = r.push(signed(t, json.dumps(HEADER).encode(), json.dumps(claims).encode()))
    assert answer.status_code == 202, answer.text
    compliance = facts.get(("device_compliance", Entity("Device", device["id"]), None))
    assert [f.fact[-1] for f in compliance] == ["not-compliant"]
    assert "Traceback" not in r.server.log.read_text()
